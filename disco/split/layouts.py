"""Owner maps (assignment.py) as layouts: what a node holds of a value, what an operand must hold for an
operation to run where its result lives, and what moving a value from one layout to another sends.

All maps are per image (the value for one image: its batch axis has its per-image size).
"""
from __future__ import annotations

import math

import torch

from disco.split.assignment import REPLICATED, holds


def broadcast_owner(owner: torch.Tensor, shape) -> torch.Tensor:
    return owner.reshape((1,) * (len(shape) - owner.dim()) + tuple(owner.shape)).expand(shape)


def replicated(shape) -> torch.Tensor:
    """A value every node has (a constant, the input): a broadcast view, no memory per element."""
    return torch.full((), float(REPLICATED)).expand(tuple(shape))


def needs(operand_shape, result: torch.Tensor) -> torch.Tensor:
    """Owner map an operand broadcast against a result must have so that each node can compute its own result
    elements: the node that reads each operand element, REPLICATED where several do."""
    shape = tuple(operand_shape)
    padded = (1,) * (result.dim() - len(shape)) + shape
    dims = [d for d, size in enumerate(padded) if size == 1 and result.shape[d] != 1]
    dims += list(range(result.dim() - len(shape)))  # leading dims the operand lacks
    dims = sorted(set(dims))
    if not dims:
        return result.reshape(shape)
    low, high = result.amin(dim=dims, keepdim=True), result.amax(dim=dims, keepdim=True)
    single = torch.where(low == high, low, torch.full_like(low, float(REPLICATED)))
    return single.reshape(shape)


def transfers(source: torch.Tensor, target: torch.Tensor, nodes: int) -> torch.Tensor:
    """[src, dst] elements per image that moving a value from layout `source` to `target` sends: every element
    goes from its owner to each node that must hold it in `target` and does not hold it yet."""
    source, target = source.flatten(), target.flatten()
    matrix = torch.zeros(nodes, nodes, dtype=torch.long)
    owned = source >= 0
    for d in range(nodes):
        wanted = owned & holds(target, d) & (source != d)
        if bool(wanted.any()):
            matrix[:, d] += torch.bincount(source[wanted].long(), minlength=nodes)
    return matrix


def varying_dims(mask: torch.Tensor) -> list[int]:
    """Dims along which a (boolean or owner) map is not constant (a broadcast dim, stride 0, never is)."""
    return [d for d in range(mask.dim()) if mask.shape[d] > 1 and mask.stride(d) != 0
            and not bool((mask == mask.narrow(d, 0, 1)).all())]


def compact(owner: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the map without its broadcast dims, how many elements each of its elements stands for): owner maps are
    mostly broadcast views of per-channel assignments, so counting on the compact map is much cheaper."""
    factor = 1
    for d in range(owner.dim()):
        if owner.shape[d] > 1 and owner.stride(d) == 0:
            factor *= owner.shape[d]
            owner = owner.narrow(d, 0, 1)
    return owner, factor


def held_counts(owner: torch.Tensor, nodes: int) -> list[int]:
    """Elements each node holds (its own and replicated ones), as `holds(owner, k).sum()` for every k."""
    small, factor = compact(owner)
    ids = small.reshape(-1).long()
    if ids.numel() and int(ids.min()) < REPLICATED:
        return [int(holds(owner, k).sum()) for k in range(nodes)]
    counts = torch.bincount(ids - REPLICATED, minlength=nodes - REPLICATED).tolist()
    return [(counts[k - REPLICATED] + counts[0]) * factor for k in range(nodes)]


def split_of(owner: torch.Tensor, node: int) -> tuple[int | None, torch.Tensor | None]:
    """(dim, held indices along it) of what `node` holds, or (None, None) when it holds all of it or none."""
    held = holds(owner, node)
    dims = varying_dims(held)
    if not dims:
        return None, None
    if len(dims) > 1:
        raise ValueError(f"held along dims {dims}")
    dim = dims[0]
    line = held.movedim(dim, -1).reshape(-1, held.shape[dim])[0]
    return dim, line.nonzero().flatten()


def representable(owner: torch.Tensor, nodes: int) -> bool:
    """Every node's part is the whole value narrowed along one dim (what operations other than data movement
    run on)."""
    if len(varying_dims(owner)) <= 1:  # every node's held elements follow the owners: one dim at most
        return True
    return all(len(varying_dims(holds(owner, node))) <= 1 for node in range(nodes))


def channel_pattern(owner: torch.Tensor, dim: int) -> torch.Tensor | None:
    """The assignment along `dim` shared by every line of fully owned elements, or None."""
    if owner.dim() == 0:
        return None
    rows = owner.movedim(dim, -1).reshape(-1, owner.shape[dim])
    full = rows[(rows >= 0).all(dim=1)]
    if not full.numel() or not bool((full == full[0]).all()):
        return None
    return full[0]


def fill_replicated(owner: torch.Tensor) -> torch.Tensor:
    """Replicated elements of a value that is otherwise split by channel (a class token concatenated to split
    tokens, padding added to split data) belong, at no cost, to the node of their channel: every node has them."""
    if owner.dim() < 1 or not bool((owner == REPLICATED).any()) or not bool((owner >= 0).any()):
        return owner
    for dim in [owner.dim() - 1, 1] if owner.dim() > 1 else [0]:
        pattern = channel_pattern(owner, dim)
        if pattern is None:
            continue
        view = [1] * owner.dim()
        view[dim] = -1
        filled = torch.where(owner == REPLICATED, pattern.reshape(view).expand(owner.shape), owner)
        rows = filled.movedim(dim, -1).reshape(-1, owner.shape[dim])
        if bool((rows == rows[0]).all()):
            return filled
    return owner


def uniform_along(owner: torch.Tensor, dims: list[int]) -> torch.Tensor | None:
    """The owner map reduced over `dims` (kept as size 1) when every line along them has one owner, else None."""
    if not dims:
        return owner
    low, high = owner.amin(dim=dims, keepdim=True), owner.amax(dim=dims, keepdim=True)
    return low if bool((low == high).all()) else None


def majority_along(owner: torch.Tensor, dims: list[int], nodes: int) -> torch.Tensor:
    """For each line along `dims`, the node owning most of it (ties: the lowest; all replicated: REPLICATED);
    `dims` kept as size 1."""
    moved = owner.movedim(dims, list(range(owner.dim() - len(dims), owner.dim())))
    kept_shape = moved.shape[:owner.dim() - len(dims)]
    lines = moved.reshape(-1, math.prod(owner.shape[d] for d in dims))
    counts = torch.stack([(lines == k).sum(1) for k in range(nodes)], 1)
    best = counts.argmax(1).to(owner.dtype)
    best = torch.where(counts.sum(1) > 0, best, torch.full_like(best, float(REPLICATED)))
    shape = list(owner.shape)
    for d in dims:
        shape[d] = 1
    result = best.reshape(kept_shape)
    for d in sorted(dims):
        result = result.unsqueeze(d)
    return result.reshape(shape)
