"""Steps that exchange data with other ranks on one rank: channel-mixing layers (conv, linear: mixing.py) and norms
and reductions over elements that span ranks (LayerNorm, GroupNorm, sums, means, variances: norm.py)."""
from __future__ import annotations

import torch
from torch import fx

from disco.runtime.mixing import mixing_step
from disco.runtime.norm import GroupNormStep, LayerNormStep, ReduceStep
from disco.runtime.rank_graph import RankGraph
from disco.runtime.steps import Exchanging, Operands, Reducing, Step
from disco.split.capture import shape_at
from disco.split.rules.reductions import reduced_dims

aten = torch.ops.aten
DEFAULT_EPS = 1e-5  # the norms' eps when the graph node does not pass one


def mixing_layer_step(rank_graph: RankGraph, graph_node: fx.Node, operands: Operands) -> Step:
    """A conv/linear call run from its layer's plan: the rank's weight blocks, its sends and receives."""
    call = rank_graph.mixing_calls[graph_node.name]
    plan = rank_graph.plans[call.module]
    layout = rank_graph.output_layouts(graph_node)[0]
    step = mixing_step(call.module, _mixing_apply(graph_node), plan, rank_graph.tensors, rank_graph.rank, layout,
                       rank_graph.transport, call.in_shape)
    return Exchanging(graph_node, operands, _on_device(step, rank_graph.device))


def _mixing_apply(graph_node: fx.Node):
    """The graph's conv/linear call with any weight, bias (and, for a grouped conv, number of groups)."""
    if graph_node.target is aten.linear.default:
        return lambda x, w, b, groups=None: torch.nn.functional.linear(x, w, b)
    groups_at = 8 if graph_node.target is aten.convolution.default else 6
    rest, kwargs = list(graph_node.args[3:]), dict(graph_node.kwargs)

    def apply(x, w, b, groups=None):
        args, named = list(rest), dict(kwargs)
        if groups is not None:
            if len(graph_node.args) > groups_at:
                args[groups_at - 3] = groups
            else:
                named["groups"] = groups
        return graph_node.target(x, w, b, *args, **named)
    return apply


def _on_device(step, device: torch.device):
    """The step with every tensor it holds (alone, in a dict or in a list) moved to `device`."""
    for key, value in vars(step).items():
        if isinstance(value, torch.Tensor):
            setattr(step, key, value.to(device))
        elif isinstance(value, dict) and any(isinstance(v, torch.Tensor) for v in value.values()):
            setattr(step, key, {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in value.items()})
        elif isinstance(value, list) and value and all(isinstance(v, torch.Tensor) for v in value):
            setattr(step, key, [v.to(device) for v in value])
    return step


def exchange_step(rank_graph: RankGraph, graph_node: fx.Node, operands: Operands) -> Step:
    """A norm or reduction over elements that span ranks, exchanging partial results among their holders."""
    exchange = rank_graph.exchanges[graph_node.name]
    x_owner = rank_graph.propagator.owner_of(graph_node.args[0])
    holders = sorted(int(k) for k in x_owner.unique().tolist() if k >= 0)
    if exchange.kind == "layer_norm":
        return _layer_norm_step(rank_graph, graph_node, operands, holders)
    if exchange.kind == "group_norm":
        return group_norm_step(rank_graph, graph_node, operands)
    return _reduction_step(rank_graph, graph_node, operands, exchange.kind, holders, x_owner)


def _layer_norm_step(rank_graph: RankGraph, graph_node: fx.Node, operands: Operands, holders: list[int]) -> Step:
    args = graph_node.args
    dims = len(args[1])
    total = int(torch.tensor(args[1]).prod())
    native = graph_node.target is aten.native_layer_norm.default
    eps = args[4] if len(args) > 4 else DEFAULT_EPS
    call = LayerNormStep(graph_node.name, holders, rank_graph.rank, dims, total, eps, native)
    params = [rank_graph.position(graph_node, 2), rank_graph.position(graph_node, 3)]  # weight, bias
    return Reducing(graph_node, operands, call, params)


def group_norm_step(rank_graph: RankGraph, graph_node: fx.Node, operands: Operands) -> Step:
    """A GroupNorm on this rank's channels, with its own groups (the graph's group count is the whole
    tensor's), exchanging partial sums of the groups whose channels span ranks."""
    args = graph_node.args
    x_owner = rank_graph.propagator.owner_of(args[0])
    native = graph_node.target is aten.native_group_norm.default
    groups = args[6] if native else args[1]
    eps = args[7] if native else (args[4] if len(args) > 4 else DEFAULT_EPS)
    channels = x_owner.movedim(1, -1).reshape(-1, x_owner.shape[1])[0].long()
    spatial = x_owner[0, 0].numel() if x_owner.dim() > 2 else 1
    call = GroupNormStep(graph_node.name, channels, rank_graph.rank, groups, eps, spatial, native)
    weight_at, bias_at = (1, 2) if native else (2, 3)
    params = [rank_graph.position(graph_node, weight_at), rank_graph.position(graph_node, bias_at)]
    return Reducing(graph_node, operands, call.to(rank_graph.device), params)


def _reduction_step(rank_graph: RankGraph, graph_node: fx.Node, operands: Operands, kind: str, holders: list[int],
                    x_owner: torch.Tensor) -> Step:
    """A sum, mean or variance over dims whose elements span ranks."""
    dims = reduced_dims(graph_node, x_owner.dim())
    x = graph_node.args[0]
    total = int(torch.tensor([x_owner.shape[d] for d in dims]).prod())

    def kept_shape(batch):
        return tuple(1 if d in dims else s for d, s in enumerate(shape_at(x, batch)))

    def out_shape(batch):
        return shape_at(graph_node, batch)
    call = ReduceStep(graph_node.name, kind, holders, rank_graph.rank, rank_graph.nodes, dims, kept_shape, out_shape,
                      total, _correction(graph_node))
    return Reducing(graph_node, operands, call, [], batch_args=True)


def _correction(graph_node: fx.Node) -> int:
    """A variance's Bessel correction (var.dim says it with `unbiased`, the others with `correction`)."""
    correction = graph_node.kwargs.get("correction", 1)
    if graph_node.target is aten.var.dim:
        correction = 1 if (graph_node.args[2] if len(graph_node.args) > 2 else True) else 0
    return 1 if correction is None else correction
