"""Exact per-layer costs of one channel-mixing call: bytes each node sends, MACs and parameters per node,
all read off the layer's split plan (disco/split/plan.py)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from disco.accounting.costs import LayerCosts
from disco.split.layers import DiscoLayer
from disco.transport import TransportDtype
from disco.split.analysis import MixingCall


@dataclass
class LayerCost:
    name: str
    kind: str
    in_channels: int
    out_channels: int
    elements_per_channel: int  # spatial size (H*W, or tokens) of one input channel, per image
    groups_total: int
    groups_kept: int
    dense_channels_matrix: torch.Tensor  # [src, dst] channels sent per image with every group kept
    channels_matrix: torch.Tensor  # [src, dst] channels sent per image with the current mask
    macs_per_node: list[int]
    dense_macs_per_node: list[int]
    received_macs_per_node: list[int]  # of macs_per_node: those on received channels (after the wait)
    conv_groups: int = 1

    @property
    def elements_matrix(self) -> torch.Tensor:
        return self.channels_matrix * self.elements_per_channel

    @property
    def dense_elements_matrix(self) -> torch.Tensor:
        return self.dense_channels_matrix * self.elements_per_channel

    def bytes_matrix(self, dtype: TransportDtype, dense: bool = False) -> torch.Tensor:
        """[src, dst] bytes per image: one message per pair that sends anything, as the runtime sends it."""
        channels = self.dense_channels_matrix if dense else self.channels_matrix
        return torch.tensor([[dtype.message_bytes(int(n), self.elements_per_channel) for n in row]
                             for row in channels.tolist()], dtype=torch.long)

    def costs(self, dtype: TransportDtype) -> LayerCosts:
        """The report's row of this call, its bytes in `dtype`."""
        matrix = self.bytes_matrix(dtype)
        return LayerCosts(name=self.name, type=self.kind, in_channels=self.in_channels, out_channels=self.out_channels,
                          elements_per_channel=self.elements_per_channel, groups_total=self.groups_total,
                          groups_kept=self.groups_kept, dense_bytes=int(self.bytes_matrix(dtype, dense=True).sum()),
                          bytes=int(matrix.sum()), bytes_matrix=matrix.tolist(), macs_per_node=self.macs_per_node,
                          dense_macs_per_node=self.dense_macs_per_node,
                          received_macs_per_node=self.received_macs_per_node, conv_groups=self.conv_groups)


def elements_per_channel(shape: torch.Size, channels: int, batch: int) -> int:
    """Elements of one channel of one image (spatial size, or tokens) in an activation of `shape`."""
    return math.prod(shape) // (batch * channels)


def _kernel_elements(layer: DiscoLayer) -> int:
    return math.prod(layer.weight.shape[2:])


def layer_cost(layer: DiscoLayer, call: MixingCall, batch: int) -> LayerCost:
    plan = layer.plan
    in_channels, out_channels = plan.in_channels, plan.out_assign.numel()
    per_channel_in = elements_per_channel(call.in_shape, in_channels, batch)
    per_channel_out = elements_per_channel(call.out_shape, out_channels, batch)
    possible, kept = plan.possible_groups(), plan.kept_groups()
    macs_per_pair = per_channel_out * _kernel_elements(layer)
    return LayerCost(
        name=call.module, kind=type(layer).__name__.removeprefix("Disco"), in_channels=in_channels,
        out_channels=out_channels, elements_per_channel=per_channel_in,
        groups_total=int(possible.sum()), groups_kept=int(kept.sum()),
        dense_channels_matrix=plan.sent_channels(possible).cpu(),
        channels_matrix=plan.sent_channels(kept).cpu(),
        macs_per_node=(plan.weight_pairs_per_node().cpu() * macs_per_pair).tolist(),
        dense_macs_per_node=(plan.weight_pairs_per_node(dense=True).cpu() * macs_per_pair).tolist(),
        received_macs_per_node=(plan.received_weight_pairs_per_node().cpu() * macs_per_pair).tolist(),
        conv_groups=plan.conv_groups,
    )


def layer_param_elements(layer: DiscoLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """([nodes] kept, [nodes] dense) parameter elements of a layer: its weight rows and bias entries."""
    plan, kernel = layer.plan, _kernel_elements(layer)
    bias_rows = torch.bincount(plan.out_assign.cpu(), minlength=plan.nodes) if layer.bias is not None else 0
    kept = plan.weight_pairs_per_node().cpu() * kernel + bias_rows
    dense = plan.weight_pairs_per_node(dense=True).cpu() * kernel + bias_rows
    return kept, dense
