"""Channel-to-node assignments and the "owner maps" that carry them through a graph.

An assignment is a LongTensor `a` of length C: channel c lives on node a[c]. An owner map is a float
tensor with the shape of an activation whose every element holds the node that owns it; REPLICATED (-1)
marks data every node has (the model input, constants). Owner maps let data-movement ops (view, cat,
permute, pixel_shuffle...) be followed exactly by running the same op on the map.
"""
from __future__ import annotations

import torch

REPLICATED = -1
NOT_NEEDED = -2.0  # in a map of which node reads each element of a value (needs.py): no node does


def balanced(channels: int, nodes: int) -> torch.Tensor:
    """Node k gets the contiguous block [k*C//N, (k+1)*C//N): sizes differ by at most one."""
    return torch.arange(channels) * nodes // channels if channels else torch.zeros(0, dtype=torch.long)


def majority_per_group(in_assign: torch.Tensor, groups: int, out_channels: int, nodes: int) -> torch.Tensor:
    """Output assignment of a grouped conv: each group's outputs go where most of its inputs are.

    That keeps a group local whenever its inputs sit on one node (depthwise convs always).
    Replicated inputs give no preference, so such groups are spread in balance.
    """
    per_group_in = in_assign.reshape(groups, -1)
    fallback = balanced(groups, nodes)
    owners = []
    for g in range(groups):
        owned = per_group_in[g][per_group_in[g] >= 0]
        owners.append(int(torch.bincount(owned, minlength=nodes).argmax()) if owned.numel() else int(fallback[g]))
    return torch.tensor(owners, dtype=torch.long).repeat_interleave(out_channels // groups)


def broadcast_channels(assign: torch.Tensor, shape: torch.Size, dim: int) -> torch.Tensor:
    """Owner map of the given shape whose channels along `dim` follow `assign`."""
    dim = dim % len(shape)
    view = [1] * len(shape)
    view[dim] = shape[dim]
    return assign.to(torch.float32).reshape(view).expand(shape)


def channel_vector(owner: torch.Tensor, dim: int) -> torch.Tensor | None:
    """The per-channel assignment along `dim` if ownership depends on that dim only, else None."""
    if owner.dim() == 0:
        return None
    dim = dim % owner.dim()
    moved = owner.movedim(dim, -1).reshape(-1, owner.shape[dim])
    first = moved[0]
    if not bool((moved == first).all()):
        return None
    return first.to(torch.long)


def holds(owner: torch.Tensor, node) -> torch.Tensor:
    """The one "held" rule: which elements of an assignment or owner map `node` has without communication,
    its own and replicated ones (`node` may be a tensor of node ids that broadcasts against `owner`)."""
    return (owner == node) | (owner == REPLICATED)
