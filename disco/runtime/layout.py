"""Which elements of every activation a rank holds, and how data movement becomes one local gather.

A rank holds the elements of a value whose owner is itself or REPLICATED, in increasing global order;
for a value split along one dim (channels, features) that is the global tensor with that dim narrowed
to the held indices. Owner maps are computed for one image; at run time every op keeps images apart,
so the same per-image layout and gather index serve any batch.
"""
from __future__ import annotations

import torch
from torch import fx
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from disco.errors import UnsupportedOperationError
from disco.split.rules import call_node
from disco.split.assignment import holds


def _varies_along(owner: torch.Tensor, dim: int) -> bool:
    return not bool((owner == owner.narrow(dim, 0, 1)).all())


def local_shape(owner: torch.Tensor, rank: int, node_name: str = "?") -> tuple[int, ...]:
    """Per-image shape of the rank's part of a value with this owner map (batch dim kept as in `owner`)."""
    shape = list(owner.shape)
    held = holds(owner, rank)
    varying = [d for d in range(1, owner.dim()) if _varies_along(owner, d)]
    if len(varying) > 1:
        raise UnsupportedOperationError(node_name, "value layout", f"its elements are split between nodes along "
                                        f"dims {varying}; the runtime needs one split dim")
    if varying:
        dim = varying[0]
        shape[dim] = int(held.movedim(dim, -1).reshape(-1, shape[dim])[0].sum())
    elif not bool(held.all()) and owner.dim() > 1:
        shape[1] = 0  # held nowhere on this rank
    return tuple(shape)


class Gather:
    """A data-movement node (view, flatten, cat, chunk, getitem, pixel_shuffle...) on one rank: the
    rank's output elements are picked from its concatenated, flattened input elements by one index."""

    def __init__(self, node: fx.Node, owners: dict, rank: int, module=None):
        self.sources = [a for a in node.all_input_nodes if _has_tensor(owners[a])]
        ids, table = self._number_inputs(owners, rank)
        self.held_total = int(table.max()) + 1 if table.numel() else 0
        # id 0 is what an op pads with (Swin's patch merging): it reads an appended zero column
        table = torch.cat([torch.tensor([self.held_total]), table])
        out_ids = _apply(node, module, ids, owners)
        out_leaves, self.spec = tree_flatten(out_ids)
        owner_leaves = tree_flatten(owners[node])[0]
        self.indices, self.shapes = [], []
        for leaf_ids, owner in zip(out_leaves, owner_leaves):
            picked = table[leaf_ids.flatten()[holds(owner, rank).flatten()].long()]
            if bool((picked < 0).any()):
                raise UnsupportedOperationError(node.name, f"{node.op} {node.target}", "it moves elements onto this "
                                                "rank that the rank does not hold (internal layout error)")
            self.indices.append(picked)
            self.shapes.append(local_shape(owner, rank, node.name))
        self.pads = any(bool((index == self.held_total).any()) for index in self.indices)
        self.identity = len(self.sources) == 1 and len(self.indices) == 1 and torch.equal(
            self.indices[0], torch.arange(self.held_total))

    def _number_inputs(self, owners: dict, rank: int):
        """Global ids for every input element, and id -> position among the rank's held input elements."""
        ids, tables, offset, held_offset = {}, [], 0, 0
        for source in self.sources:
            def number(owner):
                nonlocal offset, held_offset
                if not isinstance(owner, torch.Tensor):
                    return owner
                first = offset + 1  # id 0 stands for padding
                numbered = torch.arange(first, first + owner.numel(), dtype=torch.float64).reshape(owner.shape)
                held = holds(owner, rank).flatten()
                table = torch.full((owner.numel(),), -1, dtype=torch.long)
                table[held] = torch.arange(int(held.sum())) + held_offset
                tables.append(table)
                offset += owner.numel()
                held_offset += int(held.sum())
                return numbered
            ids[source] = tree_map(number, owners[source])
        return ids, torch.cat(tables) if tables else torch.zeros(0, dtype=torch.long)

    def __call__(self, batch: int, *values):
        """`batch` images; leaves without a batch dim (parameters, e.g. a class token) broadcast over it."""
        leaves = [t for value in values for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
        if self.identity and leaves[0].shape[0] == batch:
            outputs = [leaves[0].reshape(batch, *self.shapes[0][1:])]
        else:
            flats = [t.reshape(t.shape[0], -1).expand(batch, -1) for t in leaves]
            if self.pads:
                flats.append(flats[0].new_zeros(batch, 1))
            flat = torch.cat(flats, dim=1) if len(flats) > 1 else flats[0]
            outputs = [flat[:, index].reshape(batch, *shape[1:]) for index, shape in zip(self.indices, self.shapes)]
        return tree_unflatten(outputs, self.spec)


def _has_tensor(value) -> bool:
    return any(isinstance(t, torch.Tensor) for t in tree_flatten(value)[0])


def _apply(node: fx.Node, module, ids: dict, owners: dict):
    """Run the node's op on element ids instead of values (non-tensor arguments keep their values)."""
    def value_of(a):
        return ids.get(a, owners[a])
    return call_node(node, module, fx.node.map_arg(node.args, value_of), fx.node.map_arg(node.kwargs, value_of))


class NarrowOperands:
    """An elementwise op whose operand is held more widely than its result (e.g. the replicated input
    added to split data, as in EDSR's bicubic skip): such operands are cut to the result's held elements."""

    def __init__(self, node: fx.Node, owners: dict, rank: int):
        result = owners[node]
        self.shape = local_shape(result, rank, node.name)
        self.picks: dict[fx.Node, torch.Tensor] = {}
        for arg in node.all_input_nodes:
            source = owners.get(arg)
            comparable = isinstance(source, torch.Tensor) and isinstance(result, torch.Tensor) \
                and source.shape == result.shape
            if comparable and not torch.equal(holds(source, rank), holds(result, rank)):
                self.picks[arg] = _held_positions(source, result, rank, node)

    def cut(self, arg: fx.Node, value: torch.Tensor) -> torch.Tensor:
        if arg not in self.picks:
            return value
        return value.reshape(value.shape[0], -1)[:, self.picks[arg]].reshape(value.shape[0], *self.shape[1:])


def _held_positions(source: torch.Tensor, result: torch.Tensor, rank: int, node: fx.Node) -> torch.Tensor:
    """Positions, among the rank's held elements of `source`, of the elements it holds of `result`."""
    held = holds(source, rank).flatten()
    table = torch.full((source.numel(),), -1, dtype=torch.long)
    table[held] = torch.arange(int(held.sum()))
    picked = table[holds(result, rank).flatten()]
    if bool((picked < 0).any()):
        raise UnsupportedOperationError(node.name, f"{node.op} {node.target}", "its result holds elements an "
                                        "operand does not have on this rank (internal layout error)")
    return picked
