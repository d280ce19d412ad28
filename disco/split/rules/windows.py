"""The rule of operations that work along some dims and independently along the others (WINDOW: pooling,
interpolation, reflect padding over the spatial dims; softmax, cumsum, sort, topk along one dim): local when the
dims they work along are held by one node, else the input is moved so that they are."""
from __future__ import annotations

import torch
from torch import fx

from disco.split.layouts import majority_along, uniform_along
from disco.split.ops import SPATIAL_DIMS
from disco.split.rules.common import arg, move_to, shaped_like, tensors

aten = torch.ops.aten


def _window_dims(graph_node: fx.Node, ndim: int) -> list[int]:
    """The dims a window operation works along, for an input of `ndim` dims."""
    spatial = len(graph_node.args[1]) // 2 if graph_node.target is aten.pad.default \
        else SPATIAL_DIMS.get(graph_node.target)
    if spatial is not None:
        return list(range(ndim - spatial, ndim))
    if graph_node.target is aten.topk.default:
        return [arg(graph_node, 2, "dim", -1) % ndim]
    return [arg(graph_node, 1, "dim", -1) % ndim]


def window(p, graph_node: fx.Node, value):
    x = p.dynamic(graph_node)[0]
    own = p.owner_of(x)
    dims = _window_dims(graph_node, own.dim())
    kept = [d for d in range(own.dim()) if d not in dims]
    if any(t.dim() != own.dim() or any(t.shape[d] != own.shape[d] for d in kept) for t in tensors(value)):
        return None
    line = uniform_along(own, dims)
    if line is None:
        line = majority_along(own, dims, p.nodes)
        move_to(p, graph_node, x, line.expand(own.shape), "it works along dims whose elements span nodes")
    return shaped_like(value, [line.expand(t.shape) for t in tensors(value)])
