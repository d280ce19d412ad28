"""Simulation-mode channel-mixing layers and the registry that maps plain layers to them.

A Disco layer *is* its plain layer (a subclass: same weights, same state-dict keys) plus three buffers:
`in_assign` (node of each input channel, -1 = replicated input), `out_assign` (node of each output
channel) and `group_mask` [nodes, in_channels]: 1 keeps communication group (c -> k), i.e. node k uses
input channel c of another node; 0 zeroes the weight slice W[a_out == k, c] so c is never sent to k.
Forward multiplies the weight by the resulting 0/1 mask, which is exactly the sum of what the nodes
compute: local (diagonal) blocks plus the kept remote columns.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from disco.errors import DiscoError


class DiscoLayer:
    """Mixin holding the split plan of one channel-mixing layer (a conv or linear)."""

    nodes: int
    in_assign: torch.Tensor
    out_assign: torch.Tensor
    group_mask: torch.Tensor

    def _attach_plan(self, in_assign: torch.Tensor, out_assign: torch.Tensor, nodes: int) -> None:
        device = self.weight.device
        self.nodes = nodes
        self.register_buffer("in_assign", in_assign.to(device=device, dtype=torch.long))
        self.register_buffer("out_assign", out_assign.to(device=device, dtype=torch.long))
        self.register_buffer("group_mask", self.possible_groups().to(self.weight.dtype))

    @property
    def conv_groups(self) -> int:
        return getattr(self, "groups", 1)

    def _node_ids(self) -> torch.Tensor:
        return torch.arange(self.nodes, device=self.in_assign.device)[:, None]

    def own_inputs(self) -> torch.Tensor:
        """[nodes, in_channels] bool: channels node k has without communication (its own, or replicated)."""
        return (self.in_assign[None] == self._node_ids()) | (self.in_assign[None] < 0)

    def outputs_per_group(self) -> torch.Tensor:
        """[nodes, groups]: how many output channels of each conv group node k computes."""
        group_of_output = torch.arange(self.out_assign.numel(), device=self.out_assign.device)
        group_of_output = group_of_output // (self.out_assign.numel() // self.conv_groups)
        counts = torch.zeros(self.nodes, self.conv_groups, dtype=torch.long, device=self.out_assign.device)
        counts.index_put_((self.out_assign, group_of_output), torch.ones_like(self.out_assign), accumulate=True)
        return counts

    def possible_groups(self) -> torch.Tensor:
        """[nodes, in_channels] bool: groups (c -> k) that exist, i.e. node k has an output reading remote c."""
        needs_group = self.outputs_per_group() > 0
        reads = needs_group.repeat_interleave(self.in_assign.numel() // self.conv_groups, dim=1)
        return reads & ~self.own_inputs()

    def keep_matrix(self) -> torch.Tensor:
        """[nodes, in_channels] 0/1 float: input channels node k uses (own, replicated, or received).
        Built from group_mask with torch.where so a mask that requires grad gets d(loss)/d(mask):
        the first-order estimate of what dropping each group costs, used when learning what to send."""
        return torch.where(self.own_inputs(), torch.ones_like(self.group_mask), self.group_mask)

    def input_columns(self) -> torch.Tensor:
        """[out, in_per_group]: the global input channel each weight column reads."""
        out_channels, in_per_group = self.weight.shape[:2]
        group_of_output = torch.arange(out_channels, device=self.weight.device) // (out_channels // self.conv_groups)
        return group_of_output[:, None] * in_per_group + torch.arange(in_per_group, device=self.weight.device)

    def weight_mask(self) -> torch.Tensor:
        """The 0/1 mask of the weight (1 = some node holds and uses it), broadcast over kernel dims."""
        rows = self.keep_matrix()[self.out_assign]
        if self.conv_groups > 1:
            rows = rows.gather(1, self.input_columns())
        mask = rows.to(self.weight.dtype)
        return mask.reshape(mask.shape + (1,) * (self.weight.dim() - 2))

    def masked_weight(self) -> torch.Tensor:
        return self.weight * self.weight_mask()

    def kept_weights_per_node(self) -> torch.Tensor:
        """[nodes]: (output, input) weight pairs each node holds, kernel elements not counted."""
        used = (self.keep_matrix() > 0).reshape(self.nodes, self.conv_groups, -1).sum(-1)
        return (self.outputs_per_group() * used).sum(-1)

    def set_group_mask(self, mask: torch.Tensor) -> None:
        """Replace the mask (any [nodes, in_channels] 0/1 tensor); groups that do not exist stay 0."""
        if mask.shape != self.group_mask.shape:
            raise DiscoError(f"group mask must have shape {tuple(self.group_mask.shape)}, got {tuple(mask.shape)}")
        possible = self.possible_groups()
        with torch.no_grad():
            self.group_mask.copy_((mask.to(self.group_mask.device) > 0) & possible)


class DiscoConv1d(DiscoLayer, nn.Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.masked_weight(), self.bias)


class DiscoConv2d(DiscoLayer, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.masked_weight(), self.bias)


class DiscoLinear(DiscoLayer, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight(), self.bias)


def _conv_kwargs(conv: nn.Module) -> dict:
    return dict(in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
                stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                bias=conv.bias is not None, padding_mode=conv.padding_mode)


def _linear_kwargs(linear: nn.Module) -> dict:
    return dict(in_features=linear.in_features, out_features=linear.out_features, bias=linear.bias is not None)


# Plain layer type -> (Disco type, constructor arguments, dim of channels in its input/output).
MIXING_LAYERS: dict[type, tuple[type, callable, int]] = {
    nn.Conv1d: (DiscoConv1d, _conv_kwargs, 1),
    nn.Conv2d: (DiscoConv2d, _conv_kwargs, 1),
    nn.Linear: (DiscoLinear, _linear_kwargs, -1),
}


def register_mixing_layer(plain: type, disco: type, kwargs_of, channel_dim: int) -> None:
    """Teach the partitioner a new channel-mixing layer type (its Disco twin must mix in DiscoLayer)."""
    MIXING_LAYERS[plain] = (disco, kwargs_of, channel_dim)


def mixing_entry(module: nn.Module):
    """The registry entry of a channel-mixing module (exact type first, then a Disco layer's base)."""
    for plain, entry in MIXING_LAYERS.items():
        if type(module) is plain or type(module) is entry[0]:
            return entry
    return None


def to_disco(module: nn.Module, in_assign: torch.Tensor, out_assign: torch.Tensor, nodes: int) -> DiscoLayer:
    """The Disco twin of a plain conv/linear, sharing its parameters (no copy)."""
    disco_type, kwargs_of, _ = mixing_entry(module)
    twin = disco_type(**kwargs_of(module), device="meta")
    twin.weight = module.weight
    if module.bias is not None:
        twin.bias = module.bias
    twin.train(module.training)
    twin._attach_plan(in_assign, out_assign, nodes)
    return twin
