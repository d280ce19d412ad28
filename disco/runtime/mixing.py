"""Channel-mixing layers on one rank: send the planned channels, compute the local part while they fly,
then add the part computed from the received channels.

Weights come from the rank's shard only (see disco/export/shards.py for their layout). A layer's output
on rank r is W[rows_r, held_r] x_held + sum_s W[rows_r, sent_s->r] x_s (+ bias), which equals the
simulation's masked weight applied to the whole input.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from disco.errors import DiscoError
from disco.export.manifest import LayerPlan
from disco.split.assignment import held_channels
from disco.runtime.comm import Comm
from disco.transport import transport_dtype



def _shard_tensor(tensors: dict, key: str) -> torch.Tensor:
    if key not in tensors:
        raise DiscoError(f"the shard lacks tensor {key!r}: it does not belong to this manifest; export again")
    return tensors[key]


def _send_plan(plan: LayerPlan, rank: int) -> tuple[torch.Tensor, dict, dict]:
    """(position of each input channel in the local tensor, -1 if not held; {dst: positions to send};
    {src: number of channels received})."""
    held = held_channels(torch.tensor(plan.in_assign), rank)
    position = torch.full((len(plan.in_assign),), -1, dtype=torch.long)
    position[held] = torch.arange(held.numel())
    send_index = {dst: position[torch.tensor(cols, dtype=torch.long)]
                  for dst, cols in enumerate(plan.sends[rank]) if dst != rank and cols}
    receive_counts = {src: len(row[rank]) for src, row in enumerate(plan.sends) if src != rank and row[rank]}
    return position, send_index, receive_counts


class MixingStep:
    """One conv/linear call (groups == 1) on one rank."""

    def __init__(self, name: str, module: nn.Module, plan: LayerPlan, tensors: dict, rank: int,
                 out_shape: tuple[int, ...], transport: str):
        self.name, self.module, self.rank = name, module, rank
        self.channel_dim = 1 if isinstance(module, (nn.Conv1d, nn.Conv2d)) else -1
        self.transport = transport_dtype(transport, runtime=True).torch_dtype
        self.out_shape = out_shape  # per-image local output shape
        position, self.send_index, self.receive_counts = _send_plan(plan, rank)
        rows = sum(1 for a in plan.out_assign if a == rank)
        self.bias = tensors.get(f"{name}.bias")
        self.local_weight = _shard_tensor(tensors, f"{name}.weight.local") if rows else None
        remote = [_shard_tensor(tensors, f"{name}.weight.from{src}") for src in self.receive_counts] if rows else []
        self.remote_weight = torch.cat(remote, dim=1) if remote else None
        self._check(int((position >= 0).sum()), rows)

    def _check(self, held: int, rows: int) -> None:
        expected = [(self.local_weight, held)] + ([(self.remote_weight, sum(self.receive_counts.values()))]
                                                  if self.remote_weight is not None else [])
        for weight, columns in expected:
            if weight is not None and (weight.shape[0] != rows or weight.shape[1] != columns):
                raise DiscoError(f"layer {self.name}: shard weight of shape {tuple(weight.shape)} does not fit the "
                                 f"manifest ({rows} rows, {columns} columns); export again")

    def _apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.channel_dim == 1:
            return self.module._conv_forward(x, weight, bias)
        return F.linear(x, weight, bias)

    def _received_shape(self, x: torch.Tensor, channels: int) -> tuple[int, ...]:
        shape = list(x.shape)
        shape[self.channel_dim] = channels
        return tuple(shape)

    def __call__(self, x: torch.Tensor, comm: Comm) -> torch.Tensor:
        sends = {dst: x.index_select(self.channel_dim, index).to(self.transport)
                 for dst, index in self.send_index.items()}
        receives = {src: (self._received_shape(x, count), self.transport) for src, count in self.receive_counts.items()}
        flying = comm.exchange(sends, receives, category="activations", what=f"layer {self.name}")
        batch = x.shape[0]
        y = None
        if self.local_weight is not None and self.local_weight.shape[1] > 0:
            y = self._apply(x, self.local_weight, self.bias)
        received = flying.wait()
        if self.remote_weight is not None:
            remote = torch.cat([received[src] for src in self.receive_counts], dim=self.channel_dim).to(x.dtype)
            part = self._apply(remote, self.remote_weight, None if y is not None else self.bias)
            y = part if y is None else y + part
        if y is None:  # this rank computes no output channel, or none of its inputs reach it
            y = torch.zeros((batch, *self.out_shape[1:]), dtype=x.dtype, device=x.device)
            if self.bias is not None and self.bias.numel():
                y = y + self.bias.reshape([-1] + [1] * (y.dim() - 2)) if self.channel_dim == 1 else y + self.bias
        return y


class GroupedMixingStep:
    """A grouped conv (depthwise included). Each group's outputs live on one node; the rank assembles
    the inputs of its groups (held, received, or zero for dropped channels), then runs one grouped conv."""

    def __init__(self, name: str, module: nn.Module, plan: LayerPlan, tensors: dict, rank: int,
                 out_shape: tuple[int, ...], transport: str):
        if module.padding_mode != "zeros":
            raise DiscoError(f"layer {name}: grouped convs with padding_mode={module.padding_mode!r} are not "
                             "supported by the runtime")
        self.name, self.module, self.rank, self.out_shape = name, module, rank, out_shape
        self.transport = transport_dtype(transport, runtime=True).torch_dtype
        in_assign, out_assign = torch.tensor(plan.in_assign), torch.tensor(plan.out_assign)
        groups = module.groups
        per_group_out, per_group_in = out_assign.numel() // groups, in_assign.numel() // groups
        owner_of_group = out_assign.reshape(groups, per_group_out)
        if not bool((owner_of_group == owner_of_group[:, :1]).all()):
            raise DiscoError(f"layer {name}: a conv group's outputs are split across nodes; the runtime needs each "
                             "group on one node")
        mine = (owner_of_group[:, 0] == rank).nonzero().flatten()
        self.groups = mine.numel()
        needed = (mine[:, None] * per_group_in + torch.arange(per_group_in)).flatten()
        position, self.send_index, self.receive_counts = _send_plan(plan, rank)
        held = (position >= 0).nonzero().flatten()
        slot = torch.full((in_assign.numel(),), -1, dtype=torch.long)
        slot[needed] = torch.arange(needed.numel())
        local = needed[position[needed] >= 0]
        self.local_from, self.local_to = position[local], slot[local]
        self.remote_to = {src: slot[torch.tensor(plan.sends[src][rank], dtype=torch.long)]
                          for src in self.receive_counts}
        self.inputs = needed.numel()
        self.identity = (not self.receive_counts and torch.equal(self.local_from, torch.arange(held.numel()))
                         and torch.equal(self.local_to, torch.arange(self.inputs)))
        self.weight = _shard_tensor(tensors, f"{name}.weight.grouped")
        self.bias = tensors.get(f"{name}.bias")
        if self.weight.shape[0] != self.groups * per_group_out:
            raise DiscoError(f"layer {name}: shard weight of shape {tuple(self.weight.shape)} does not fit the "
                             "manifest; export again")
        self.conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(module.kernel_size)]

    def __call__(self, x: torch.Tensor, comm: Comm) -> torch.Tensor:
        sends = {dst: x.index_select(1, index).to(self.transport) for dst, index in self.send_index.items()}
        receives = {}
        for src, count in self.receive_counts.items():
            receives[src] = ((x.shape[0], count, *x.shape[2:]), self.transport)
        received = comm.exchange(sends, receives, category="activations", what=f"layer {self.name}").wait()
        if self.groups == 0:
            return torch.zeros((x.shape[0], *self.out_shape[1:]), dtype=x.dtype, device=x.device)
        if self.identity:
            assembled = x
        else:
            assembled = x.new_zeros((x.shape[0], self.inputs, *x.shape[2:]))
            assembled[:, self.local_to] = x[:, self.local_from]
            for src, slots in self.remote_to.items():
                assembled[:, slots] = received[src].to(x.dtype)
        m = self.module
        return self.conv(assembled, self.weight, self.bias, m.stride, m.padding, m.dilation, self.groups)


def mixing_step(name: str, module: nn.Module, plan: LayerPlan, tensors: dict, rank: int,
                out_shape: tuple[int, ...], transport: str):
    kind = GroupedMixingStep if getattr(module, "groups", 1) > 1 else MixingStep
    return kind(name, module, plan, tensors, rank, out_shape, transport)
