"""Simulation-mode channel-mixing layers and the registry that maps plain layers to them.

A Disco layer *is* its plain layer (a subclass: same weights, same state-dict keys) plus three buffers:
`in_assign` (node of each input channel, -1 = replicated input), `out_assign` (node of each output
channel) and `group_mask` [nodes, in_channels]: 1 keeps communication group (c -> k), i.e. node k uses
input channel c of another node; 0 zeroes the weight slice W[a_out == k, c] so c is never sent to k.
Forward multiplies the weight by the resulting 0/1 mask, which is exactly the sum of what the nodes
compute: local (diagonal) blocks plus the kept remote columns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from disco.errors import DiscoError
from disco.quantization import round_trip
from disco.split.plan import SplitPlan
from disco.transport import get_transport_dtype


class DiscoLayer:
    """Mixin: a conv or linear that applies its split plan (disco/split/plan.py). The plan's tensors are the
    layer's buffers, so they follow the layer across devices and state-dict loads."""

    nodes: int
    in_assign: torch.Tensor
    out_assign: torch.Tensor
    group_mask: torch.Tensor

    def _attach_plan(self, plan: SplitPlan) -> None:
        device = self.weight.device
        self.nodes = plan.nodes
        self.register_buffer("in_assign", plan.in_assign.to(device=device, dtype=torch.long))
        self.register_buffer("out_assign", plan.out_assign.to(device=device, dtype=torch.long))
        self.register_buffer("group_mask", self.plan.possible_groups().to(self.weight.dtype))

    @property
    def plan(self) -> SplitPlan:
        return SplitPlan(nodes=self.nodes, in_assign=self.in_assign, out_assign=self.out_assign,
                         conv_groups=self.conv_groups, channel_dim=mixing_kind(self).channel_dim,
                         mask=getattr(self, "group_mask", None))

    @property
    def conv_groups(self) -> int:
        return getattr(self, "groups", 1)

    def masked_weight(self) -> torch.Tensor:
        return self.weight * self.plan.weight_mask(self.weight)

    def set_group_mask(self, mask: torch.Tensor) -> None:
        """Replace the mask (any [nodes, in_channels] 0/1 tensor); groups that do not exist stay 0."""
        if mask.shape != self.group_mask.shape:
            raise DiscoError(f"group mask must have shape {tuple(self.group_mask.shape)}, got {tuple(mask.shape)}")
        possible = self.plan.possible_groups()
        with torch.no_grad():
            self.group_mask.copy_((mask.to(self.group_mask.device) > 0) & possible)

    transport = "fp32"  # the dtype received channels travel in (set_transport): the simulation rounds them alike

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind, dtype = mixing_kind(self), get_transport_dtype(self.transport)
        if dtype.lossless:
            return kind.apply(self, x, self.masked_weight(), self.bias)
        # as a node computes it: held columns on the exact input, received ones on what the network delivers
        local, remote = self.plan.weight_masks(self.weight)
        y = kind.apply(self, x, self.weight * local, self.bias)
        received = round_trip(x, dtype, kind.channel_dim, self.in_assign)
        return y + kind.apply(self, received, self.weight * remote, None)


class DiscoConv1d(DiscoLayer, nn.Conv1d):
    pass


class DiscoConv2d(DiscoLayer, nn.Conv2d):
    pass


class DiscoLinear(DiscoLayer, nn.Linear):
    pass


def _conv_kwargs(conv: nn.Module) -> dict:
    return dict(in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
                stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                bias=conv.bias is not None, padding_mode=conv.padding_mode)


def _linear_kwargs(linear: nn.Module) -> dict:
    return dict(in_features=linear.in_features, out_features=linear.out_features, bias=linear.bias is not None)


def _conv_apply(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    return module._conv_forward(x, weight, bias)


def _linear_apply(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    return F.linear(x, weight, bias)


@dataclass(frozen=True)
class MixingKind:
    """A channel-mixing layer type: its Disco twin, the twin's constructor arguments, the dim of channels in
    its input/output, and `apply(module, x, weight, bias)`, the layer's computation with any weight (the
    simulation passes the masked weight, the runtime a rank's blocks)."""

    plain: type
    disco: type
    kwargs_of: Callable[[nn.Module], dict]
    channel_dim: int
    apply: Callable


MIXING_LAYERS: dict[type, MixingKind] = {kind.plain: kind for kind in (
    MixingKind(nn.Conv1d, DiscoConv1d, _conv_kwargs, 1, _conv_apply),
    MixingKind(nn.Conv2d, DiscoConv2d, _conv_kwargs, 1, _conv_apply),
    MixingKind(nn.Linear, DiscoLinear, _linear_kwargs, -1, _linear_apply),
)}


def register_mixing_layer(kind: MixingKind) -> None:
    """Teach the partitioner and the runtime a new channel-mixing layer type (its Disco twin mixes in
    DiscoLayer)."""
    MIXING_LAYERS[kind.plain] = kind


def mixing_kind(module: nn.Module) -> MixingKind | None:
    """The registry entry of a channel-mixing module (exact type first, then a Disco layer's base)."""
    for kind in MIXING_LAYERS.values():
        if type(module) is kind.plain or type(module) is kind.disco:
            return kind
    return None


def to_disco(module: nn.Module, plan: SplitPlan) -> DiscoLayer:
    """The Disco twin of a plain conv/linear, sharing its parameters (no copy)."""
    twin = mixing_kind(module).disco(**mixing_kind(module).kwargs_of(module), device="meta")
    twin.weight = module.weight
    if module.bias is not None:
        twin.bias = module.bias
    twin.train(module.training)
    twin._attach_plan(plan)
    return twin
