"""The rule of normalisations (NORM): BatchNorm normalises over no dim (local); LayerNorm and GroupNorm over dims
or groups that may span nodes, and then every node holding part of them exchanges its partial sums."""
from __future__ import annotations

import math
import operator

import torch
from torch import fx

from disco.split.analysis import Exchange
from disco.split.assignment import REPLICATED, channel_vector
from disco.split.layouts import replicated, uniform_along
from disco.split.ops import op_name
from disco.split.rules.common import shaped_like, tensors

aten = torch.ops.aten
BATCH_NORMS = (aten._native_batch_norm_legit_no_training.default, aten.batch_norm.default)
LAYER_NORMS = (aten.native_layer_norm.default, aten.layer_norm.default)
GROUP_NORMS = (aten.native_group_norm.default, aten.group_norm.default)


def channel_aligned(shape, own: torch.Tensor) -> tuple[int, ...]:
    """A per-channel parameter's shape aligned with its input's channels (dim 1), for broadcasting."""
    return tuple(math.prod(shape) if d == 1 else 1 for d in range(own.dim()))


def norm(p, graph_node: fx.Node, value):
    x = graph_node.args[0]
    if x in p.static or any(a not in p.static for a in p.tensor_operands(graph_node)[1:]):
        return None
    own = p.owner_of(x)
    outputs = tensors(value)
    if graph_node.target in BATCH_NORMS:
        return shaped_like(value, [own] + [replicated(t.shape) for t in outputs[1:]])
    if graph_node.target in LAYER_NORMS:
        return _layer_norm(p, graph_node, value, own, outputs)
    return _group_norm(p, graph_node, value, own, outputs)


def _stats_used(graph_node: fx.Node) -> bool:
    """Does anything read the norm's mean or rstd outputs (which a split over its dims leaves partial)?"""
    return any(u.target is operator.getitem and u.args[1] != 0 and u.users for u in graph_node.users)


def _layer_norm(p, graph_node, value, own, outputs):
    dims = list(range(own.dim() - len(graph_node.args[1]), own.dim()))
    line = uniform_along(own, dims)
    if line is None:
        if bool((own == REPLICATED).any()) or _stats_used(graph_node):
            return None
        positions = own.numel() // math.prod(own.shape[d] for d in dims)
        holders = own.unique().long().tolist()
        matrix = torch.zeros(p.nodes, p.nodes, dtype=torch.long)
        for h in holders:
            for g in holders:
                if g != h:
                    matrix[h, g] = 2 * positions
        p.record(Exchange(graph_node.name, op_name(graph_node.target), "layer_norm", matrix))
        stats = [replicated(t.shape) for t in outputs[1:]]
    else:
        stats = [line.reshape(t.shape) for t in outputs[1:]]
    return shaped_like(value, [own] + stats)


def _group_norm(p, graph_node, value, own, outputs):
    native = graph_node.target is aten.native_group_norm.default
    groups = graph_node.args[6] if native else graph_node.args[1]
    vector = channel_vector(own, 1)
    if vector is None:
        return None
    per_group = vector.reshape(groups, -1)
    spanning = per_group.amin(1) != per_group.amax(1)
    if bool(spanning.any()):
        if bool((per_group[spanning] < 0).any()) or _stats_used(graph_node):
            return None
        matrix = torch.zeros(p.nodes, p.nodes, dtype=torch.long)
        for row in per_group[spanning]:
            holders = row.unique().tolist()
            for h in holders:
                for g in holders:
                    if g != h:
                        matrix[h, g] += 2
        p.record(Exchange(graph_node.name, op_name(graph_node.target), "group_norm", matrix))
    return shaped_like(value, [own] + [replicated(t.shape) for t in outputs[1:]])
