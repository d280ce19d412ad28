"""Steps of data movement on one rank (view, cat, getitem...), and operands cut to what their result needs.

A movement is one gather of the rank's held elements (layout.py's Gather), or, when that picks exactly what the
operation itself would, the operation run natively on the local tensor (a view, a permute: no copy).
"""
from __future__ import annotations

import torch
from torch import fx
from torch.utils._pytree import tree_leaves

from disco.runtime.layout import Gather, Layout, Narrowing
from disco.runtime.rank_graph import RankGraph
from disco.runtime.steps import Move, NativeMove, Operands, Step
from disco.split.capture import batch_axis
from disco.split.layouts import needs
from disco.split.ops import Rule, index_operands, rule_of
from disco.split.rules.movement import run_move

aten = torch.ops.aten
# movements whose size argument is the result's shape: run natively with this rank's local shape
RESHAPES = (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default,
            aten.view_copy.default, aten.expand_copy.default)
LAYER_NORMS = (aten.layer_norm.default, aten.native_layer_norm.default)


def move_step(rank_graph: RankGraph, graph_node: fx.Node, operands: Operands, layouts: list[Layout]) -> Step:
    """The movement as a gather of the held elements of its sources (its operands but the indices it reads), or
    run natively when that is the same."""
    tensor_operands = rank_graph.tensor_operands(graph_node)
    indices = index_operands(graph_node)
    sources = [i for i, a in enumerate(tensor_operands) if a not in indices]
    source_layouts = [_source_layout(rank_graph, operands, i, tensor_operands[i]) for i in sources]
    gather = Gather(graph_node.name, [tensor_operands[i] for i in sources], source_layouts, layouts,
                    lambda ids: run_move(rank_graph.propagator, graph_node, lambda a: ids[a]))
    only_source = sources[0] if len(sources) == 1 else None
    native = _native_move(rank_graph, graph_node, source_layouts, layouts, gather, only_source)
    if native is not None:
        return NativeMove(graph_node, operands, native)
    return Move(graph_node, operands, gather.to(rank_graph.device), sources)


def _source_layout(rank_graph: RankGraph, operands: Operands, position: int, source: fx.Node) -> Layout:
    """A source's layout as the movement reads it: after its move, if it has one."""
    if position in operands.moves:
        return operands.moves[position].after
    return rank_graph.layout(rank_graph.owner(source), None if source in rank_graph.static else batch_axis(source))


def _native_move(rank_graph: RankGraph, graph_node: fx.Node, sources: list[Layout], outputs: list[Layout],
                 gather: Gather, source: int | None):
    """The movement run as itself on the local tensor (a view, a permute: no copy) when that gives, for one
    image, exactly what the gather would pick; a reshape to the local output shape. None: use the gather.
    `source`: the operand index of the movement's only source (None: it has several)."""
    if source is None or gather.pads or sources[0].flat or any(o.flat for o in outputs):
        return None
    reshape = graph_node.target in RESHAPES
    if reshape and len(outputs) != 1:
        return None
    operand = rank_graph.tensor_operands(graph_node)[source]
    ids = torch.arange(sources[0].count, dtype=torch.float64).reshape(sources[0].local_shape)
    value_of = rank_graph.propagator.value_of

    def call(x, args, kwargs, batch):
        args = list(args)
        args[0] = x
        if reshape:
            args[1] = list(outputs[0].tensor(x.new_empty((batch, outputs[0].count)), batch).shape)
        return graph_node.target(*args, **kwargs)
    try:
        args = fx.node.map_arg(graph_node.args, lambda a: ids if a is operand else value_of(a))
        kwargs = fx.node.map_arg(graph_node.kwargs, lambda a: value_of(a))
        if graph_node.args[0] is not operand:
            return None
        leaves = [t for t in tree_leaves(call(ids, args, kwargs, 1)) if isinstance(t, torch.Tensor)]
    except (RuntimeError, ValueError, IndexError, TypeError):
        return None
    if len(leaves) != len(outputs) or any(
            tuple(leaf.shape) != layout.local_shape or not torch.equal(layout.rows(leaf, 1)[0].long(), index)
            for leaf, layout, index in zip(leaves, outputs, gather.indices)):
        return None
    return call


def narrow_operands(rank_graph: RankGraph, graph_node: fx.Node, operands: Operands, layouts: list[Layout]) -> None:
    """Cut operands held more widely than the result needs (pointwise: by broadcasting; norms and local
    contractions: their parameters by the channels of their input)."""
    if not layouts:
        return
    result = rank_graph.result_owners(graph_node)[0]
    for position, operand in enumerate(rank_graph.tensor_operands(graph_node)):
        if position in operands.moves or (position == 0 and rule_of(graph_node.target) is not Rule.POINTWISE):
            continue
        owner = rank_graph.owner(operand)
        wanted = _wanted(graph_node, owner.shape, result)
        if wanted is None:
            continue
        narrowing = Narrowing(rank_graph.layout(owner, None), rank_graph.layout(wanted, None))
        if narrowing.needed_any:
            operands.narrowings[position] = narrowing.to(rank_graph.device)


def _wanted(graph_node: fx.Node, shape: torch.Size, result: torch.Tensor) -> torch.Tensor | None:
    """The owner map of what the result needs of an operand of `shape` (None: all of it)."""
    rule = rule_of(graph_node.target)
    if rule is Rule.POINTWISE:
        return needs(tuple(shape), result)
    if rule is Rule.NORM and len(shape) == 1 and graph_node.target not in LAYER_NORMS:
        aligned = tuple(shape[0] if d == 1 else 1 for d in range(result.dim()))
        return needs(aligned, result).reshape(shape)
    if rule is Rule.NORM:
        return needs(tuple(shape), result)
    return None
