"""The deployment graph as one rank sees it: what the builders of the rank's steps (step_builder.py, move_steps.py,
exchange_steps.py) and of its output layout (output.py) ask of a graph node, answered in one place."""
from __future__ import annotations

import torch
from torch import fx
from torch.utils._pytree import tree_leaves

from disco.runtime.deployment_graph import DeploymentGraph
from disco.runtime.layout import Layout, Redistribution
from disco.split.capture import BatchAxis, batch_axes, batch_axis
from disco.transport import TransportDtype


class RankGraph:
    """The deployment's graph, with this rank's tensors (on its device) and the plans it runs: each value's owner
    map, the rank's layout of it, a graph node's tensor operands, and the moves between layouts."""

    def __init__(self, graph: DeploymentGraph, plans: dict, tensors: dict[str, torch.Tensor], rank: int, nodes: int,
                 device: torch.device, transport: TransportDtype):
        self.graph, self.plans, self.tensors = graph, plans, tensors
        self.rank, self.nodes, self.device, self.transport = rank, nodes, device, transport
        self.propagator, self.static, self.keys = graph.propagator, graph.static, graph.keys
        # both by graph node name
        self.mixing_calls = {call.graph_node: call for call in graph.analysis.mixing}
        self.exchanges = {exchange.graph_node: exchange for exchange in graph.analysis.exchanges}

    def graph_nodes(self):
        return self.graph.captured.graph_module.graph.nodes

    def tensor_operands(self, graph_node: fx.Node) -> list[fx.Node]:
        return self.propagator.tensor_operands(graph_node)

    def owner(self, graph_node: fx.Node) -> torch.Tensor:
        """The owner map of a graph node's value (a static one: its placement's, when the analysis placed it)."""
        if graph_node in self.static:
            placement = self.graph.analysis.statics.get(self.keys.get(graph_node))
            return placement.owner if placement is not None else self.propagator.owner_of(graph_node)
        return self.propagator.owners[graph_node]

    def result_owners(self, graph_node: fx.Node) -> list[torch.Tensor]:
        """The owner map of each tensor of a graph node's result."""
        return [o for o in tree_leaves(self.propagator.owners[graph_node]) if isinstance(o, torch.Tensor)]

    def layout(self, owner: torch.Tensor, axis: BatchAxis | None) -> Layout:
        return Layout.of(owner, self.rank, axis)

    def output_layouts(self, graph_node: fx.Node) -> list[Layout]:
        """This rank's layout of each tensor of a graph node's result."""
        return [self.layout(o, axis) for o, axis in zip(self.result_owners(graph_node), batch_axes(graph_node))]

    def position(self, graph_node: fx.Node, arg_index: int) -> int | None:
        """Operand index of graph_node.args[arg_index] among its tensor operands (None: absent)."""
        arg = graph_node.args[arg_index] if len(graph_node.args) > arg_index else None
        if not isinstance(arg, fx.Node):
            return None
        return self.tensor_operands(graph_node).index(arg)

    def redistribution(self, name: str, before: torch.Tensor, after: torch.Tensor, value: fx.Node) -> Redistribution:
        """The move of `value`'s result from owner map `before` to `after`, on this rank's device."""
        move = Redistribution(name, before, after, self.rank, self.nodes, batch_axis(value), value.meta["val"].dtype)
        return move.to(self.device)

    def norm_tensors(self, graph_node: fx.Node) -> list[torch.Tensor | None]:
        """This rank's weight, bias, running mean and variance of a BatchNorm graph node (from its shard)."""
        return [self.tensors.get(self.keys.get(a)) if isinstance(a, fx.Node) else None for a in graph_node.args[1:5]]
