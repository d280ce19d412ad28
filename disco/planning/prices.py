"""Communication groups priced by what they cost on a topology, for training to a latency budget (docs/method.md 11).

A group (layer, c -> k) costs, per image, the time its channel takes on the link from c's node to k
(bytes / bandwidth) plus the time k spends on the MACs that read it (MACs / k's rate). So a channel sent over a
slow link costs more than one over a fast link, and a slow node's received channels cost more than a fast
node's. The sparsifier keeps the most important groups per unit of that price (instead of per byte); at its last
cut it keeps as many as the plan's predicted latency (disco/planning/latency.py) allows: the latency budget is met
by the plan, exactly in the sense of the prediction.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from disco.accounting.groups import group_bytes
from disco.accounting.layer_cost import elements_per_channel
from disco.accounting.report import cost_report
from disco.errors import DiscoError
from disco.planning.latency import predict
from disco.split.partitioner import disco_layers, model_split
from disco.topology import Topology


def group_seconds(model: nn.Module, example_inputs, topology: Topology, transport_dtype: str = "fp32"
                  ) -> dict[str, torch.Tensor]:
    """{layer: [nodes, in_channels] seconds per image} each existing group costs on `topology` (0 elsewhere)."""
    layers = disco_layers(model)
    split = model_split(model, example_inputs)
    nodes, analysis = split.nodes, split.analysis
    topology.check_nodes(nodes, "the model")
    sizes = group_bytes(model, example_inputs, transport_dtype)
    seconds_per_byte = torch.tensor([[0.0 if s == d else 1.0 / topology.bandwidth[s][d] for d in range(nodes)]
                                     for s in range(nodes)])
    seconds_per_mac = torch.tensor([1.0 / node.macs_per_s for node in topology.nodes])
    prices = {}
    for name, layer in layers.items():  # the wire: group_bytes already sums a layer's calls
        source = layer.plan.in_assign.clamp(min=0).cpu()  # replicated channels form no group (their size is 0)
        prices[name] = sizes[name] * seconds_per_byte[source].T  # [dst, in]: seconds per byte from c's node to dst
    for call in analysis.mixing:  # the compute: once per call
        layer = layers[call.module]
        plan = layer.plan
        outputs = plan.outputs_per_group().cpu().repeat_interleave(plan.in_per_group, dim=1)  # [dst, in] rows
        positions = elements_per_channel(call.out_shape, plan.out_assign.numel(), analysis.batch)
        macs = outputs * math.prod(layer.weight.shape[2:]) * positions
        prices[call.module] = prices[call.module] + macs * seconds_per_mac[:, None] * (sizes[call.module] > 0)
    return prices


@dataclass
class LatencyBudget:
    """Train to `seconds` of predicted latency per image on `topology`."""

    topology: Topology
    seconds: float
    example_inputs: torch.Tensor
    transport_dtype: str = "fp32"

    def __post_init__(self) -> None:
        if not (isinstance(self.seconds, (int, float)) and math.isfinite(self.seconds) and self.seconds > 0):
            raise DiscoError(f"a latency budget must be a positive number of seconds, got {self.seconds!r}")

    def prices(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return group_seconds(model, self.example_inputs, self.topology, self.transport_dtype)

    def latency(self, model: nn.Module) -> float:
        """Predicted seconds per image of `model` with its current masks."""
        return predict(cost_report(model, self.example_inputs, transport_dtype=self.transport_dtype).expected(),
                       self.topology).latency_s

    def check_reachable(self, model: nn.Module) -> None:
        """Refuse the budget if `model` (partitioned) sending nothing is predicted to take longer."""
        silent = copy.deepcopy(model)
        for layer in disco_layers(silent).values():
            layer.set_group_mask(torch.zeros_like(layer.group_mask))
        no_communication_s = self.latency(silent)
        if no_communication_s > self.seconds:
            raise DiscoError(f"a latency budget of {self.seconds * 1e3:.1f} ms cannot be met on this topology: even "
                             f"sending nothing is predicted to take {no_communication_s * 1e3:.1f} ms per image "
                             "(raise the budget, add nodes, or give faster nodes a larger --node-weights share)")
