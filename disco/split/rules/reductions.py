"""The rule of reductions (REDUCE: sum, mean, amax, var, norms of vectors...): local when the reduced dims are held
by one node; else, for those whose partial results combine (ops.PARTIAL), each node's partial result is exchanged."""
from __future__ import annotations

import torch
from torch import fx

from disco.errors import DiscoError
from disco.split.analysis import Exchange
from disco.split.assignment import REPLICATED
from disco.split.capture import batch_axis
from disco.split.layouts import replicated, uniform_along
from disco.split.ops import PARTIAL, op_name
from disco.split.rules.common import arg, shaped_like, tensors

aten = torch.ops.aten


def reduced_dims(graph_node: fx.Node, ndim: int) -> list[int]:
    """The dims a reduction reduces, for an input of `ndim` dims (all of them when it names none)."""
    position = 2 if graph_node.target is aten.linalg_vector_norm.default else 1
    dims = arg(graph_node, position, "dim", None)
    if dims is None or dims == []:
        return list(range(ndim))
    dims = [dims] if isinstance(dims, int) else list(dims)
    return sorted(d % ndim for d in dims)


def reduce(p, graph_node: fx.Node, value):
    x = p.dynamic(graph_node)[0]
    own = p.owner_of(x)
    dims = reduced_dims(graph_node, own.dim())
    axis = batch_axis(x)
    if axis is not None and axis.dim in dims:
        raise DiscoError(f"graph node '{graph_node.name}' ({op_name(graph_node.target)}) reduces over the images "
                         "of a batch: DISCO runs images independently and cannot split a model that mixes them")
    outputs = tensors(value)
    line = uniform_along(own, dims)
    if line is not None:
        return shaped_like(value, [line.reshape(t.shape) for t in outputs])
    kind = PARTIAL.get(graph_node.target)
    if kind is None or len(outputs) != 1 or bool((own == REPLICATED).any()):
        return None
    values = outputs[0].numel() * (2 if kind == "var" else 1)
    holders = own.unique().long().tolist()
    matrix = torch.zeros(p.nodes, p.nodes, dtype=torch.long)
    for h in holders:
        matrix[h] = values
        matrix[h, h] = 0
    p.record(Exchange(graph_node.name, op_name(graph_node.target), kind, matrix))
    return replicated(outputs[0].shape)
