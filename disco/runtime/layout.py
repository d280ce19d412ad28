"""What a rank holds of every value, and data movement as one local gather.

A rank holds the elements of a value whose owner is itself or REPLICATED (the one "held" rule), in increasing
global order. Usually that is the value narrowed along one dim (a box: channels, heads); a value that only data
movement reads may be held in any pattern (flat: the held elements of each image in a row). Owner maps are
computed for one image; every operation keeps images apart, so the same per-image layout and gather index serve
any batch. Where an image's elements are in a value is its batch axis (capture.BatchAxis): usually dim 0, possibly
with several entries per image (windows, heads) or in another dim after a permute.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from disco.errors import DiscoError
from disco.split.assignment import holds
from disco.split.capture import BatchAxis
from disco.split.layouts import varying_dims


@dataclass
class Layout:
    """One rank's part of a value (see the module doc). `shape`: the whole value for one image."""

    shape: tuple[int, ...]
    axis: BatchAxis | None
    held: torch.Tensor  # [elements per image] bool
    dim: int | None = None  # a box narrowed along this dim (None: every element, or a flat pattern)
    index: torch.Tensor | None = None  # the held indices along `dim`
    flat: bool = False

    @classmethod
    def of(cls, owner: torch.Tensor, rank: int, axis: BatchAxis | None) -> "Layout":
        held = holds(owner, rank)
        shape = tuple(owner.shape)
        dims = varying_dims(held)
        flat_held = held.reshape(-1).clone()
        if len(dims) > 1:
            return cls(shape, axis, flat_held, flat=True)
        if not dims:
            if not bool(flat_held.any()):  # held nowhere: empty along the dim the value is split along, if one
                split = varying_dims(owner)
                return cls(shape, axis, flat_held, split[0] if len(split) == 1 else None,
                           torch.zeros(0, dtype=torch.long) if len(split) == 1 else None)
            return cls(shape, axis, flat_held)
        line = held.movedim(dims[0], -1).reshape(-1, shape[dims[0]])[0]
        return cls(shape, axis, flat_held, dims[0], line.nonzero().flatten())

    @property
    def count(self) -> int:
        """Elements held per image."""
        return int(self.held.sum())

    @property
    def anything(self) -> bool:
        return bool(self.held.any())

    @property
    def local_shape(self) -> tuple[int, ...]:
        """The held part's shape for one image (flat: one row)."""
        if self.flat:
            return (self.count,)
        if not self.anything:
            empty = self.dim if self.dim is not None else self._empty_dim()
            return tuple(0 if d == empty else s for d, s in enumerate(self.shape))
        shape = list(self.shape)
        if self.dim is not None:
            shape[self.dim] = self.index.numel()
        return tuple(shape)

    def _empty_dim(self) -> int:
        batch = self.axis.dim if self.axis is not None else -1
        return next((d for d in range(len(self.shape)) if d != batch), 0)

    def rows(self, value: torch.Tensor, batch: int) -> torch.Tensor:
        """[batch, held elements of one image]: the local value with each image's elements in a row."""
        if self.flat or self.axis is None:
            return value.reshape(batch if self.flat else 1, -1).expand(batch, -1)
        axis = self.axis
        if axis.dim != 0:
            value = value.unflatten(axis.dim, (batch, -1)).movedim(axis.dim, 0)
        return value.reshape(batch, -1)

    def tensor(self, rows: torch.Tensor, batch: int) -> torch.Tensor:
        """The local value from its rows (inverse of `rows`)."""
        if self.flat:
            return rows
        shape = self.local_shape
        if self.axis is None:
            return rows[0].reshape(shape)
        value = rows.reshape(batch, *shape)
        if self.axis.dim != 0:
            value = value.movedim(0, self.axis.dim)
        return value.flatten(self.axis.dim, self.axis.dim + 1)

    def empty(self, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The local value of a rank that holds none of it (or a fresh one to fill)."""
        return self.tensor(torch.empty((batch, self.count), dtype=dtype, device=device), batch)


def _has_tensor(value) -> bool:
    return any(isinstance(t, torch.Tensor) for t in tree_flatten(value)[0])


class Gather:
    """A data movement on one rank: its output elements picked from its sources' held elements by one index
    (`apply_to_ids(ids_by_source)` runs the operation on element ids in place of values)."""

    def __init__(self, name: str, sources: list, layouts: list[Layout], outputs: list[Layout], apply_to_ids):
        self.name, self.sources, self.layouts, self.outputs = name, sources, layouts, outputs
        ids, table = {}, []
        offset, held_offset = 0, 0
        for source, layout in zip(sources, layouts):
            size = math.prod(layout.shape)
            ids[source] = torch.arange(offset + 1, offset + size + 1, dtype=torch.float64).reshape(layout.shape)
            part = torch.full((size,), -1, dtype=torch.long)
            part[layout.held] = torch.arange(layout.count) + held_offset
            table.append(part)
            offset += size
            held_offset += layout.count
        self.held_total = held_offset
        # id 0 is what the operation pads with: it reads an appended zero column
        table = torch.cat([torch.tensor([held_offset]), *table]) if table else torch.tensor([0])
        self.template, self.spec = tree_flatten(apply_to_ids(ids))
        out_ids = [t for t in self.template if isinstance(t, torch.Tensor)]
        self.indices = []
        for leaf_ids, layout in zip(out_ids, outputs):
            picked = table[leaf_ids.reshape(-1)[layout.held].long()]
            if bool((picked < 0).any()):
                raise DiscoError(f"graph node '{name}': it moves elements onto a rank that does not hold them "
                                 "(internal layout error)")
            self.indices.append(picked)
        self.pads = any(bool((index == held_offset).any()) for index in self.indices)
        self.identity = (len(sources) == 1 and len(self.indices) == 1 and torch.equal(
            self.indices[0], torch.arange(held_offset)))

    def _rebuild(self, leaves: list):
        it = iter(leaves)
        return tree_unflatten([next(it) if isinstance(t, torch.Tensor) else t for t in self.template], self.spec)

    def to(self, device: torch.device) -> "Gather":
        self.indices = [i.to(device) for i in self.indices]
        return self

    def __call__(self, batch: int, values: list[torch.Tensor]):
        rows = [layout.rows(value, batch) for layout, value in zip(self.layouts, values)]
        if self.identity:
            return tree_unflatten([self.outputs[0].tensor(rows[0], batch)], self.spec) if len(self.template) == 1 \
                else self._rebuild([self.outputs[0].tensor(rows[0], batch)])
        if self.pads:
            rows.append(rows[0].new_zeros(batch, 1) if rows else torch.zeros(batch, 1))
        flat = torch.cat(rows, dim=1) if len(rows) > 1 else rows[0]
        leaves = iter([layout.tensor(flat[:, index], batch) for index, layout in zip(self.indices, self.outputs)])
        return tree_unflatten([next(leaves) if isinstance(t, torch.Tensor) else t for t in self.template], self.spec)


class Narrowing:
    """Operands of a pointwise operation held more widely than its result needs (a replicated activation added
    to split data, a norm's weight stored whole): cut to the elements this rank's result reads."""

    def __init__(self, operand: Layout, needed: Layout):
        self.operand, self.needed = operand, needed
        if needed.flat or operand.flat:
            raise DiscoError("a pointwise operand laid out in a pattern (internal layout error)")
        self.dim, self.pick = None, None
        if needed.dim is not None and (operand.dim is None or operand.dim == needed.dim):
            held = operand.index if operand.dim is not None else torch.arange(operand.shape[needed.dim])
            position = torch.full((operand.shape[needed.dim],), -1, dtype=torch.long)
            position[held] = torch.arange(held.numel())
            self.pick = position[needed.index]
            if bool((self.pick < 0).any()):
                raise DiscoError("an operand lacks elements its result needs (internal layout error)")
            self.dim = needed.dim
            if torch.equal(self.pick, torch.arange(held.numel())):
                self.dim = None  # already exactly what is needed

    @property
    def needed_any(self) -> bool:
        return self.dim is not None

    def to(self, device: torch.device) -> "Narrowing":
        if self.pick is not None:
            self.pick = self.pick.to(device)
        return self

    def __call__(self, value: torch.Tensor) -> torch.Tensor:
        if self.dim is None:
            return value
        return value.index_select(self.dim, self.pick)


class Redistribution:
    """A value moved from one layout to another on one rank (a fallback's gather and re-split, a layout change an
    operation needs): each element goes from its owner to every node the new layout has hold it and that did not
    hold it before, in increasing global order on both sides."""

    def __init__(self, name: str, source: torch.Tensor, target: torch.Tensor, rank: int, nodes: int,
                 axis: BatchAxis | None, dtype: torch.dtype):
        self.name, self.dtype = name, dtype
        source = source.broadcast_to(target.shape) if source.shape != target.shape else source
        self.before, self.after = Layout.of(source, rank, axis), Layout.of(target, rank, axis)
        src, dst = source.reshape(-1), target.reshape(-1)
        in_before = torch.full((src.numel(),), -1, dtype=torch.long)
        in_before[self.before.held] = torch.arange(self.before.count)
        in_after = torch.full((dst.numel(),), -1, dtype=torch.long)
        in_after[self.after.held] = torch.arange(self.after.count)
        self.sends = {}
        for peer in range(nodes):
            wanted = (src == rank) & holds(dst, peer) & ~holds(src, peer)
            if peer != rank and bool(wanted.any()):
                self.sends[peer] = in_before[wanted]
        self.receives = {}
        arriving = self.after.held & ~self.before.held
        for peer in range(nodes):
            wanted = arriving & (src == peer)
            if peer != rank and bool(wanted.any()):
                self.receives[peer] = in_after[wanted]
        kept = self.after.held & self.before.held
        self.keep_from, self.keep_to = in_before[kept], in_after[kept]

    def to(self, device: torch.device) -> "Redistribution":
        self.sends = {k: v.to(device) for k, v in self.sends.items()}
        self.receives = {k: v.to(device) for k, v in self.receives.items()}
        self.keep_from, self.keep_to = self.keep_from.to(device), self.keep_to.to(device)
        return self

    def __call__(self, value: torch.Tensor, batch: int, comm) -> torch.Tensor:
        rows = self.before.rows(value, batch)
        sends = {peer: rows[:, index] for peer, index in self.sends.items()}
        receives = {peer: ((batch, index.numel()), self.dtype) for peer, index in self.receives.items()}
        flying = comm.exchange(sends, receives, category="fallback", what=f"moving {self.name}")
        out = torch.empty((batch, self.after.count), dtype=self.dtype, device=value.device)
        if self.keep_from.numel():
            out[:, self.keep_to] = rows[:, self.keep_from]
        for peer, arrived in flying.wait().items():
            out[:, self.receives[peer]] = arrived.to(self.dtype)
        return self.after.tensor(out, batch)
