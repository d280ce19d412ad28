"""Which node reads each element of the values no rule splits by itself, found after the propagation from how
their readers ended up split:

- the model's own tensors that operations read (a norm's weight, a position embedding, an attention bias gathered
  from a table): a shard stores on each node only what it reads (placement.py);
- values computed from those alone, broadcast over the batch (a class token expanded to every image): every node
  could compute them whole, but each computes and keeps only what its readers use.
"""
from __future__ import annotations

import operator

import torch
from torch import fx
from torch.utils._pytree import tree_leaves

from disco.split.analysis import StaticPlacement
from disco.split.assignment import NOT_NEEDED, REPLICATED, holds
from disco.split.layouts import needs, replicated, representable
from disco.split.ops import Rule, index_operands, rule_of
from disco.split.rules.movement import move_readers
from disco.split.rules.norms import BATCH_NORMS, GROUP_NORMS, channel_aligned
from disco.split.weights import reads_parameter

_CHANNEL_NORMS = BATCH_NORMS + GROUP_NORMS  # their weight and bias are per channel (dim 1)


def _result(p, user: fx.Node) -> list[torch.Tensor]:
    """The user's result owners as it computes them (before a re-split)."""
    owner = p.result_changes[user][0] if user in p.result_changes else p.owners[user]
    return [o for o in tree_leaves(owner) if isinstance(o, torch.Tensor)]


def _holders(result: torch.Tensor, nodes: int, shape) -> torch.Tensor:
    present = [k for k in range(nodes) if bool(holds(result, k).any())]
    return torch.full((), float(present[0] if len(present) == 1 else REPLICATED)).expand(tuple(shape))


def operand_need(p, user: fx.Node, operand: fx.Node) -> torch.Tensor | None:
    """Owner map, in the operand's shape, of the node that reads each of its elements where `user` runs as
    propagated (REPLICATED: several); None for a channel-mixing layer's weight or bias (its plan places them)."""
    shape = p.shape_of(operand)
    if user.op == "output" or user.target is operator.getitem:
        return replicated(shape)
    if user in p.executors:
        return torch.full(tuple(shape), float(p.executors[user]))
    if user in p.layer_outputs and operand in user.args[1:3]:
        return None
    if operand in index_operands(user):
        return replicated(shape)
    result = _result(p, user)
    rule = rule_of(user.target)
    if rule is Rule.POINTWISE:
        return needs(shape, result[0].broadcast_to(result[0].shape))
    if rule is Rule.MOVE:
        return move_readers(p, user, operand, result)
    if rule is Rule.NORM and operand is not user.args[0]:
        if user.target in _CHANNEL_NORMS:
            return needs(channel_aligned(shape, result[0]), result[0]).reshape(shape)
        return needs(shape, result[0])
    return _holders(result[0], p.nodes, shape)


def merge(previous: torch.Tensor | None, need: torch.Tensor) -> torch.Tensor:
    """Two readers' needs of one tensor: the same node, else REPLICATED."""
    if previous is None:
        return need
    merged = torch.where(previous == NOT_NEEDED, need, previous)
    return torch.where((need != NOT_NEEDED) & (need != merged), torch.full_like(merged, REPLICATED), merged)


def need_of(p, graph_node: fx.Node) -> torch.Tensor | None:
    """Which node reads each element of a value (merged over its readers), or None when a layer's plan holds it."""
    found = None
    for user in graph_node.users:
        if user in p.static:
            continue
        need = operand_need(p, user, graph_node)
        if need is None:
            continue
        found = merge(found, need.broadcast_to(p.shape_of(graph_node)).clone())
    return found


def narrow_constants(p) -> None:
    """Values computed from the model's tensors alone and made whole on every node (REPLICATED): each node keeps
    only what its readers read (the propagation's last step, readers first)."""
    moved = {operand for changed, changes in p.operand_changes.items() for position, _ in changes.items()
             for operand in [p.tensor_operands(changed)[position]]}
    constant = []
    for graph_node in p.graph.nodes:
        if graph_node.op == "call_function" and graph_node not in p.static \
                and isinstance(p.owners.get(graph_node), torch.Tensor) \
                and all(a in p.static or a in constant for a in p.tensor_operands(graph_node)) \
                and rule_of(graph_node.target) in (Rule.MOVE, Rule.POINTWISE) and graph_node not in p.executors:
            constant.append(graph_node)
    for graph_node in reversed(constant):
        owner = p.owners[graph_node]
        if graph_node in moved or graph_node in p.result_changes or not bool((owner == REPLICATED).all()):
            continue
        need = need_of(p, graph_node)
        if need is not None and representable(need, p.nodes) and bool((need != REPLICATED).any()):
            p.owners[graph_node] = need


def place_statics(p) -> dict[str, StaticPlacement]:
    """Where each static tensor an operation reads is stored: on the nodes that read it (as a layout a node can run
    on), or whole on every node."""
    placed = {}
    for graph_node in p.graph.nodes:
        if graph_node not in p.static or graph_node.op == "get_attr" \
                or not any(u not in p.static for u in graph_node.users):
            continue
        need = need_of(p, graph_node)
        if need is None:
            continue
        index = any(graph_node in index_operands(u) for u in graph_node.users)
        if index or not representable(need, p.nodes):
            need = replicated(need.shape)
        role, name = p.captured.roles.get(graph_node, ("", ""))
        key = name if graph_node.op == "placeholder" else f"static.{graph_node.name}"
        placed[key] = StaticPlacement(key, graph_node.name, need, reads_parameter(p.captured, graph_node),
                                      graph_node.meta["val"].element_size(), index)
    return placed
