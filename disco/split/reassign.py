"""Re-assigning a layer instead of moving data (the propagator's `pullback`): when an operation wants an operand
in another layout, and that operand comes from a channel-mixing layer's output through data movement and
operations that keep their operand's owners, the layer's output channels are re-assigned so that the operand
arrives as wanted. The propagation then runs again with that assignment (`Reassign`), for free: nothing moves.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from disco.split.analysis import MixingCall
from disco.split.ops import Rule, index_operands, rule_of


class Reassign(Exception):
    """Internal: some layers' output assignments should change; the propagation runs again with them.
    `vectors[layer] = (out_assign, channels some operation asked for)`."""

    def __init__(self, vectors: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        self.vectors = vectors
        super().__init__(", ".join(vectors))


def whole_groups(out_assign: torch.Tensor, groups: int) -> bool:
    """A grouped conv computes each group's outputs on one node (its plan needs the group's inputs there)."""
    per_group = out_assign.reshape(groups, -1)
    return groups == 1 or bool((per_group == per_group[:, :1]).all())


def pullback(p, graph_node: fx.Node, target: torch.Tensor) -> bool:
    """Ask for value `graph_node` to have owner map `target` by re-assigning the output channels of the layer it
    comes from through data movement; True when such a re-assignment was asked for (the propagation runs again).
    Never on a deployment's rank (`frozen`): its plans are the exporter's final ones."""
    if p.frozen:
        return False
    traced = _carried_ids(p, graph_node)
    if traced is None:
        return False
    call, ids = traced
    desired = _desired_channels(call, ids, target)
    if desired is None:
        return False
    # the layers whose layouts the target was decided on (through the other operands)
    depends = frozenset().union(*(p.upstream.get(a, frozenset()) for a in p.dynamic(p.current_graph_node)
                                  if a is not graph_node))
    if any(layer in p.reassigns for layer in depends):
        return True  # decided on a layout a pending re-assignment changes: the next run decides again
    vector, constrained = desired
    return _request(p, call, vector, constrained, depends)


def _request(p, call: MixingCall, vector: torch.Tensor, constrained: torch.Tensor, depends: frozenset) -> bool:
    """Record the re-assignment of `call`'s layer (its `constrained` channels as `vector` says), unless it
    undoes what another operation asked for or changes nothing; True when recorded."""
    for layer in [m for m, deps in p.request_depends.items() if call.module in deps and m != call.module]:
        del p.reassigns[layer], p.request_depends[layer]  # decided on this layer's old layout: stale
    base, fixed = p.reassigns.get(call.module, (p.overrides.get(call.module, call.out_assign),
                                                p.fixed.get(call.module)))
    if fixed is not None and bool((fixed & constrained & (vector != base)).any()):
        return False  # another operation already asked for these channels elsewhere: no ping-pong
    merged = torch.where(constrained, vector, base)
    if torch.equal(merged, call.out_assign) or not whole_groups(merged, call.conv_groups):
        return False
    p.reassigns[call.module] = (merged, constrained if fixed is None else fixed | constrained)
    p.request_depends[call.module] = p.request_depends.get(call.module, frozenset()) | depends | {call.module}
    return True


def _carried_ids(p, graph_node: fx.Node) -> tuple[MixingCall, torch.Tensor] | None:
    """(the layer call a value comes from element by element, the element ids of that call's output (from 1)
    carried to the value: 0 where not from the layer), or None when it comes from no one layer call."""
    chain, current = [], graph_node
    while current not in p.layer_outputs:
        source = _transparent_source(p, current)
        if source is None:
            return None
        chain.append(current)
        current = source
    shape = p.owner_of(current).shape
    values = {current: torch.arange(1, shape.numel() + 1, dtype=torch.float64).reshape(shape)}
    for step in reversed(chain):
        values[step] = _replay(p, step, values)
    return p.layer_outputs[current], values[graph_node]


def _transparent_source(p, graph_node: fx.Node) -> fx.Node | None:
    """The one activation a value comes from element by element (data movement, or any operation whose result
    keeps its operand's owners: pointwise, norms, softmax...), or None."""
    if graph_node.op != "call_function" or graph_node in p.static:
        return None
    if graph_node.target is operator.getitem:
        source = graph_node.args[0]
        owner = p.owners.get(source)
        if rule_of(source.target) is Rule.MOVE or (isinstance(owner, (tuple, list)) and graph_node.args[1] == 0):
            return source
        return None
    if graph_node in p.operand_changes or graph_node in p.result_changes or graph_node in p.executors:
        return None
    dynamic = p.dynamic(graph_node)
    if len(dynamic) != 1:
        return None
    if rule_of(graph_node.target) is Rule.MOVE:
        return dynamic[0]
    owner = p.owners[graph_node]
    first = owner[0] if isinstance(owner, (tuple, list)) else owner
    source = p.owner_of(dynamic[0])
    if not isinstance(first, torch.Tensor) or source.shape != first.shape or not torch.equal(source, first):
        return None
    return dynamic[0]


def _replay(p, graph_node: fx.Node, values: dict) -> torch.Tensor:
    """Element ids of the layer's output carried to a value (0: not from the layer)."""
    if graph_node.target is operator.getitem:
        carried = values[graph_node.args[0]]
        return carried if isinstance(carried, torch.Tensor) else carried[graph_node.args[1]]  # output 0 of a norm
    source = p.dynamic(graph_node)[0]
    if rule_of(graph_node.target) is not Rule.MOVE:
        return values[source]

    def ids_for(a):
        if a is source:  # contiguous: ids carried through a copy that changed strides may not view as the graph's
            return values[source].contiguous()
        if a in p.static:
            return torch.zeros_like(p.kept[a], dtype=torch.float64) \
                if a not in index_operands(graph_node) else p.kept[a]
        return p.kept.get(a, a)
    args = fx.node.map_arg(graph_node.args, ids_for)
    kwargs = fx.node.map_arg(graph_node.kwargs, ids_for)
    return graph_node.target(*args, **kwargs)


def _desired_channels(call: MixingCall, ids: torch.Tensor, target: torch.Tensor):
    """(out_assign with the channels the target constrains set, which channels it constrains), or None."""
    flat_ids, flat_target = ids.flatten().long(), target.broadcast_to(ids.shape).flatten()
    mapped = flat_ids > 0
    if bool((flat_target[mapped] < 0).any()):
        return None  # a replicated target cannot come from one layer's channels
    size = int(call.out_shape.numel())
    low = torch.full((size,), float("inf")).scatter_reduce(0, flat_ids[mapped] - 1, flat_target[mapped], "amin")
    high = torch.full((size,), -1.0).scatter_reduce(0, flat_ids[mapped] - 1, flat_target[mapped], "amax")
    wanted = high >= 0
    if bool((low[wanted] != high[wanted]).any()):
        return None
    dim = call.channel_dim % len(call.out_shape)
    per_channel = high.reshape(call.out_shape).movedim(dim, -1).reshape(-1, call.out_shape[dim])
    vector, constrained = call.out_assign.clone(), torch.zeros(call.out_shape[dim], dtype=torch.bool)
    for channel in range(call.out_shape[dim]):
        column = per_channel[:, channel]
        chosen = column[column >= 0]
        if not chosen.numel():
            continue
        if not bool((chosen == chosen[0]).all()):
            return None
        vector[channel], constrained[channel] = int(chosen[0]), True
    return vector, constrained
