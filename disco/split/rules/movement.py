"""The rule of data movement (MOVE: view, cat, permute, index with constants...): followed exactly by running the
same operation on the owner maps, and run backwards (`move_readers`) to find which node reads each operand element.
"""
from __future__ import annotations

import math

import torch
from torch import fx

from disco.split.assignment import NOT_NEEDED, REPLICATED, holds
from disco.split.layouts import fill_replicated
from disco.split.ops import index_operands
from disco.split.rules.common import arg, shaped_like, tensors
from disco.split.rules.windows import window

aten = torch.ops.aten


def run_move(p, graph_node: fx.Node, data_of):
    """Run a data movement with `data_of(operand)` in place of each data operand (indices keep their values, and
    constants it adds become 0)."""
    indices, operands = index_operands(graph_node), set(p.tensor_operands(graph_node))

    def value_for(a):
        if a in operands and a not in indices:
            return data_of(a)
        return p.value_of(a)
    args = list(fx.node.map_arg(graph_node.args, value_for))
    kwargs = dict(fx.node.map_arg(graph_node.kwargs, value_for))
    constant = {aten.constant_pad_nd.default: 2, aten.scatter.value: 3, aten.pad.default: 3}.get(graph_node.target)
    if constant is not None and len(args) > constant:
        args[constant] = 0  # what it adds is a constant: REPLICATED, whatever its value
    return graph_node.target(*args, **kwargs)


def move(p, graph_node: fx.Node, value):
    if graph_node.target is aten.pad.default and arg(graph_node, 2, "mode", "constant") != "constant":
        return window(p, graph_node, value)  # reflect/replicate padding works within each channel's spatial dims
    if any(a not in p.static for a in index_operands(graph_node)):
        return None  # indices computed from the input: only the fallback can follow them
    shifted = run_move(p, graph_node, lambda a: torch.zeros(p.shape_of(a)) if a in p.static
                       else p.owner_of(a).contiguous() + 1)
    return shaped_like(value, [fill_replicated(t - 1) for t in tensors(shifted)])


def move_readers(p, graph_node: fx.Node, operand: fx.Node, owners: list[torch.Tensor]) -> torch.Tensor:
    """Which node reads each element of one operand of a data movement whose results lie as `owners` say
    (NOT_NEEDED: none)."""
    shape = p.shape_of(operand)
    ids = run_move(p, graph_node, lambda a: torch.arange(1, math.prod(shape) + 1, dtype=torch.float64).reshape(shape)
                   if a is operand else torch.zeros(p.shape_of(a), dtype=torch.float64))
    readers = torch.full((math.prod(shape) + 1,), NOT_NEEDED)
    for out_ids, owner in zip(tensors(ids), owners):
        for k in range(p.nodes):
            picked = out_ids.broadcast_to(owner.shape)[holds(owner, k)].long().unique()
            current = readers[picked]
            readers[picked] = torch.where((current == NOT_NEEDED) | (current == k), torch.tensor(float(k)),
                                          torch.tensor(float(REPLICATED)))
    return readers[1:].reshape(shape)
