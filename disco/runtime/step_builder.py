"""Which step (steps.py) each graph node becomes on one rank, decided once when the program is built.

Channel-mixing layers exchange channels and norms and reductions over split elements exchange partial sums
(exchange_steps.py), data movement becomes a gather (move_steps.py), operations that run on one node get their
operands moved there, and the rest runs unchanged on the local tensors, with the tensors of the model it reads
taken from the shard.
"""
from __future__ import annotations

import operator

import torch
from torch import fx
from torch.utils._pytree import tree_flatten

from disco.errors import DiscoError
from disco.runtime.exchange_steps import exchange_step, group_norm_step, mixing_layer_step
from disco.runtime.layout import Layout
from disco.runtime.move_steps import move_step, narrow_operands
from disco.runtime.rank_graph import RankGraph
from disco.runtime.steps import Constant, Input, Local, NothingHeld, Operands, Resplit, Step
from disco.split.ops import Rule, rule_of

aten = torch.ops.aten
GROUP_NORMS = (aten.group_norm.default, aten.native_group_norm.default)


def build_steps(rank_graph: RankGraph) -> list[Step]:
    """The rank's steps in graph order: one per graph node that gives this rank a value."""
    steps = (graph_node_step(rank_graph, graph_node) for graph_node in rank_graph.graph_nodes())
    return [step for step in steps if step is not None]


def graph_node_step(rank_graph: RankGraph, graph_node: fx.Node) -> Step | None:
    """The step of one graph node (None: it gives this rank no value to keep: the output, a layer's parameter)."""
    if graph_node.op == "output" or graph_node.op == "get_attr":
        return None
    if graph_node in rank_graph.static:
        return _constant(rank_graph, graph_node)
    if graph_node.op == "placeholder":
        return Input(graph_node)
    step = _core_step(rank_graph, graph_node, _operands(rank_graph, graph_node))
    result_changes = rank_graph.propagator.result_changes
    if graph_node in result_changes:
        before, after = result_changes[graph_node]
        step = Resplit(graph_node, step, rank_graph.redistribution(graph_node.name, before, after, graph_node))
    return step


def _constant(rank_graph: RankGraph, graph_node: fx.Node) -> Step | None:
    users = [u for u in graph_node.users if u not in rank_graph.static]
    if not users:
        return None
    key = rank_graph.keys.get(graph_node)
    if key in rank_graph.tensors:
        return Constant(graph_node, rank_graph.tensors[key])
    if all(_is_layer_parameter(rank_graph, graph_node, u) for u in users):
        return None  # a layer's weight or bias: its plan's blocks are in the shard instead
    raise DiscoError(f"the shard lacks tensor {key!r}: it does not belong to this manifest; export again")


def _is_layer_parameter(rank_graph: RankGraph, graph_node: fx.Node, user: fx.Node) -> bool:
    return user.name in rank_graph.mixing_calls and graph_node in user.args[1:3]


def _operands(rank_graph: RankGraph, graph_node: fx.Node) -> Operands:
    """The graph node's operands, each moved first where the propagation changed its layout for this use."""
    tensor_operands = rank_graph.tensor_operands(graph_node)
    operands = Operands.of(graph_node, tensor_operands)
    for position, target in rank_graph.propagator.operand_changes.get(graph_node, {}).items():
        source = tensor_operands[position]
        operands.moves[position] = rank_graph.redistribution(f"{source.name} for {graph_node.name}",
                                                             rank_graph.owner(source), target, source)
    return operands


def _core_step(rank_graph: RankGraph, graph_node: fx.Node, operands: Operands) -> Step:
    executors = rank_graph.propagator.executors
    if graph_node in executors:
        if rank_graph.rank == executors[graph_node]:
            return Local(graph_node, operands)
        return _nothing_held(rank_graph, graph_node, operands)
    if graph_node.name in rank_graph.mixing_calls:
        return mixing_layer_step(rank_graph, graph_node, operands)
    if graph_node.name in rank_graph.exchanges:
        return exchange_step(rank_graph, graph_node, operands)
    rule = rule_of(graph_node.target) if graph_node.target is not operator.getitem else Rule.SHAPE
    layouts = rank_graph.output_layouts(graph_node)
    if rule is Rule.MOVE:
        return move_step(rank_graph, graph_node, operands, layouts)
    if layouts and not any(layout.anything for layout in layouts):
        return _nothing_held(rank_graph, graph_node, operands)
    if rule in (Rule.POINTWISE, Rule.NORM, Rule.MIXING):
        narrow_operands(rank_graph, graph_node, operands, layouts)
    if graph_node.target in GROUP_NORMS and _holds_part(layouts):
        return group_norm_step(rank_graph, graph_node, operands)  # whole groups here, but fewer than the graph's count
    return Local(graph_node, operands)


def _nothing_held(rank_graph: RankGraph, graph_node: fx.Node, operands: Operands) -> Step:
    template, spec = tree_flatten(graph_node.meta.get("val"))
    dtypes = [t.dtype for t in template if isinstance(t, torch.Tensor)]
    return NothingHeld(graph_node, operands, rank_graph.output_layouts(graph_node), dtypes, template, spec)


def _holds_part(layouts: list[Layout]) -> bool:
    """This rank holds some elements of the value but not all (what it lacks, another rank holds)."""
    return bool(layouts) and layouts[0].anything and layouts[0].count < layouts[0].held.numel()
