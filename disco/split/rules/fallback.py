"""The general fallback (FALLBACK, and any operation a rule cannot split as its operands lie): its operands are
gathered on one node, it runs there, and its result is split again. An operation DISCO has no rule for can be given
one with `disco.register_op_rule(op, rule)` (ops.py)."""
from __future__ import annotations

import math

import torch
from torch import fx

from disco.split.analysis import Fallback
from disco.split.assignment import holds
from disco.split.ops import BIASED_CONTRACTIONS, CONTRACTIONS, CONVOLUTIONS, op_name
from disco.split.rules.common import shaped_like, tensors

aten = torch.ops.aten


def fallback(p, graph_node: fx.Node, value, reason: str):
    """Gather the operands on the node holding most of them, run there, and split the result again like its
    first operand when it has that operand's shape."""
    operands = p.tensor_operands(graph_node)
    executor = _executor(p, operands)
    for position, a in enumerate(operands):
        if a not in p.static and not bool(holds(p.owner_of(a), executor).all()):
            p.change_operand(graph_node, position, torch.full(tuple(p.shape_of(a)), float(executor)), reason)
    outputs = tensors(value)
    result = [torch.full((), float(executor)).expand(t.shape) for t in outputs]
    dynamic = [a for a in operands if a not in p.static]
    if len(outputs) == 1 and dynamic and isinstance(value, torch.Tensor) and \
            value.shape == p.shape_of(dynamic[0]) and len(p.owner_of(dynamic[0]).unique()) > 1:
        p.change_result(graph_node, p.owner_of(dynamic[0]), "its result is split again like its input")
    p.record(Fallback(graph_node.name, op_name(graph_node.target), executor, reason, _macs(graph_node, value)))
    p.run_on(graph_node, executor)
    return shaped_like(value, result)


def _executor(p, operands: list[fx.Node]) -> int:
    """The node holding most elements of the dynamic operands (ties: the lowest)."""
    counts = torch.zeros(p.nodes, dtype=torch.long)
    for a in operands:
        if a not in p.static:
            own = p.owner_of(a)
            counts += torch.tensor([int((own == k).sum()) for k in range(p.nodes)])
    return int(counts.argmax())


def _macs(graph_node: fx.Node, value) -> int:
    """The MACs of the operation run whole (convolutions and products; 0 for the rest)."""
    if not isinstance(value, torch.Tensor):
        return 0
    if graph_node.target in CONVOLUTIONS:
        return value.numel() * math.prod(graph_node.args[1].meta["val"].shape[1:])
    if graph_node.target in CONTRACTIONS:
        a = graph_node.args[1] if graph_node.target in BIASED_CONTRACTIONS else graph_node.args[0]
        return value.numel() * int(a.meta["val"].shape[-1])
    if graph_node.target is aten.linear.default:
        return value.numel() * int(graph_node.args[1].meta["val"].shape[-1])
    return 0
