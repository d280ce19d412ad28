"""Channel-mixing layers on one rank: send the planned channels, compute the local part while they fly,
then add the part computed from the received channels.

Everything about the split comes from the layer's SplitPlan (disco/split/plan.py), weights from the rank's
shard only, cut by the same plan. A layer's output on rank r is W[rows_r, held_r] x_held
+ W[rows_r, received_r] x_received (+ bias), which equals the simulation's masked weight applied to the whole
input. How the layer computes with a weight (conv, linear, a registered type) comes from its registry entry.
"""
from __future__ import annotations

import math

import torch

from disco.errors import DiscoError
from disco.quantization import MessageCodec, from_channel_major
from disco.runtime.comm import Comm
from disco.split.plan import WEIGHT_GROUPED, WEIGHT_LOCAL, WEIGHT_REMOTE, SplitPlan
from disco.transport import TransportDtype


def _codec(name: str, plan: SplitPlan, rank: int, transport: TransportDtype) -> MessageCodec:
    own = plan.held_positions(rank)[(plan.in_assign.cpu() == rank).nonzero().flatten()]
    return MessageCodec(transport, plan.channel_dim, own, f"layer {name}")


class Messages:
    """A layer's exchange on one rank: its channels encoded per receiver, what arrives decoded and put back in
    the layer's layout (in the order the remote weight columns expect: by source, then channel)."""

    def __init__(self, codec: MessageCodec, receive_counts: dict[int, int], in_shape: tuple[int, ...]):
        self.codec, self.receive_counts = codec, receive_counts
        # the layer's whole input for one image: a rank may hold none of it (empty along another dim than the
        # channels), so what arrives is shaped from the plan, never from the local tensor
        self.in_shape = tuple(in_shape)
        self.elements = elements_per_channel(self.in_shape, codec.channel_dim)  # values per channel in a row

    def post(self, x: torch.Tensor, send_index: dict[int, torch.Tensor], comm: Comm, what: str):
        """Send {dst: positions of x's channels} and post the receives; returns the exchange in flight."""
        elements = self.elements
        receives = {src: (self.codec.message_shape(x.shape[0], count, elements), self.codec.dtype.torch_dtype)
                    for src, count in self.receive_counts.items()}
        return comm.exchange(self.codec.encode(x, send_index), receives, category="activations", what=what)

    def arrived(self, received: dict, x: torch.Tensor) -> torch.Tensor:
        """Every source's channels, concatenated (by source, then channel) in x's layout."""
        parts = self._decoded(received, x)
        values = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # one peer (2 nodes): no copy
        return from_channel_major(values, self._like(x), self.codec.channel_dim)

    def arrived_by_source(self, received: dict, x: torch.Tensor) -> dict[int, torch.Tensor]:
        return {src: from_channel_major(values, self._like(x), self.codec.channel_dim)
                for src, values in zip(self.receive_counts, self._decoded(received, x))}

    def _like(self, x: torch.Tensor) -> tuple[int, ...]:
        return (x.shape[0], *self.in_shape[1:])

    def _decoded(self, received: dict, x: torch.Tensor) -> list[torch.Tensor]:
        elements = self.elements
        return [self.codec.decode(received[src], count, elements, x.dtype) for src, count in self.receive_counts.items()]


def elements_per_channel(in_shape: tuple[int, ...], channel_dim: int) -> int:
    """Values in one channel of one row of a layer's input (H*W, tokens...): its shape but the leading (batch) dim and
    the channels, known from the plan whatever this rank holds of the input."""
    channels_at = channel_dim % len(in_shape)
    return math.prod(size for dim, size in enumerate(in_shape) if dim not in (0, channels_at))


def _shard_tensor(tensors: dict, key: str) -> torch.Tensor:
    if key not in tensors:
        raise DiscoError(f"the shard lacks tensor {key!r}: it does not belong to this manifest; export again")
    return tensors[key]


class MixingStep:
    """One conv/linear call (conv groups == 1) on one rank. `apply(x, weight, bias)` is the call with any weight
    (the graph's operation with its own stride, padding...)."""

    def __init__(self, name: str, apply, plan: SplitPlan, tensors: dict, rank: int, out_layout,
                 transport: TransportDtype, in_shape: tuple[int, ...]):
        self.name, self.apply, self.rank = name, apply, rank
        self.channel_dim = plan.channel_dim
        self.out_layout = out_layout  # this rank's part of the output
        self.send_index, self.receive_counts = plan.send_positions(rank), plan.receive_counts(rank)
        self.bias = tensors.get(f"{name}.bias")
        rows, held = plan.rows(rank).numel(), plan.held_channels(rank).numel()
        self.local_weight = self._weight(tensors, WEIGHT_LOCAL, rows, held)
        self.remote_weight = self._weight(tensors, WEIGHT_REMOTE, rows, sum(self.receive_counts.values()))
        self.messages = Messages(_codec(name, plan, rank, transport), self.receive_counts, in_shape)

    def _weight(self, tensors: dict, block: str, rows: int, columns: int) -> torch.Tensor | None:
        """The block, or None when it computes nothing (no rows, or no columns)."""
        weight = _shard_tensor(tensors, f"{self.name}.{block}")
        if weight.shape[0] != rows or weight.shape[1] != columns:
            raise DiscoError(f"layer {self.name}: shard {block} of shape {tuple(weight.shape)} does not fit the "
                             f"manifest ({rows} rows, {columns} columns); export again")
        return weight if rows and columns else None

    def __call__(self, x: torch.Tensor, comm: Comm) -> torch.Tensor:
        flying = self.messages.post(x, self.send_index, comm, f"layer {self.name}")
        y = None
        if self.local_weight is not None:
            y = self.apply(x, self.local_weight, self.bias)
        received = flying.wait()
        if self.remote_weight is not None:
            remote = self.messages.arrived(received, x)
            part = self.apply(remote, self.remote_weight, None if y is not None else self.bias)
            y = part if y is None else y.add_(part)  # y is this call's own fresh output: no new tensor
        if y is None:  # this rank computes no output channel, or none of its inputs reach it
            batch = x.shape[self.out_layout.axis.dim] // self.out_layout.axis.per_image
            y = self.out_layout.empty(batch, x.dtype, x.device).zero_()
            if self.bias is not None and self.bias.numel():
                view = [-1] + [1] * (y.dim() - 2) if self.channel_dim == 1 else [-1]
                y = y + self.bias.reshape(view)
        return y


class GroupedMixingStep:
    """A grouped conv (depthwise included). Each group's outputs live on one node; the rank assembles
    the inputs of its groups (held, received, or zero for dropped channels), then runs one grouped conv
    (`apply(x, weight, bias, groups)`)."""

    def __init__(self, name: str, apply, plan: SplitPlan, tensors: dict, rank: int, out_layout,
                 transport: TransportDtype, in_shape: tuple[int, ...]):
        self.name, self.apply, self.rank, self.out_layout = name, apply, rank, out_layout
        try:
            mine = (plan.group_owners() == rank).nonzero().flatten()
        except DiscoError as error:
            raise DiscoError(f"layer {name}: {error}") from None
        self.groups = mine.numel()
        needed = (mine[:, None] * plan.in_per_group + torch.arange(plan.in_per_group)).flatten()
        self.send_index, self.receive_counts = plan.send_positions(rank), plan.receive_counts(rank)
        self.messages = Messages(_codec(name, plan, rank, transport), self.receive_counts, in_shape)
        position = plan.held_positions(rank)
        held = plan.held_channels(rank)
        slot = torch.full((plan.in_channels,), -1, dtype=torch.long)
        slot[needed] = torch.arange(needed.numel())
        local = needed[position[needed] >= 0]
        self.local_from, self.local_to = position[local], slot[local]
        sends = plan.sends()
        self.remote_to = {src: slot[sends[src][rank]] for src in self.receive_counts}
        self.inputs = needed.numel()
        self.identity = (not self.receive_counts and torch.equal(self.local_from, torch.arange(held.numel()))
                         and torch.equal(self.local_to, torch.arange(self.inputs)))
        self.weight = _shard_tensor(tensors, f"{name}.{WEIGHT_GROUPED}")
        self.bias = tensors.get(f"{name}.bias")
        if self.weight.shape[0] != plan.rows(rank).numel():
            raise DiscoError(f"layer {name}: shard weight of shape {tuple(self.weight.shape)} does not fit the "
                             "manifest; export again")

    def __call__(self, x: torch.Tensor, comm: Comm) -> torch.Tensor:
        received = self.messages.post(x, self.send_index, comm, f"layer {self.name}").wait()
        received = self.messages.arrived_by_source(received, x)
        if self.groups == 0:
            return self.out_layout.empty(x.shape[0], x.dtype, x.device)
        if self.identity:
            assembled = x
        else:
            assembled = x.new_zeros((x.shape[0], self.inputs, *x.shape[2:]))
            assembled[:, self.local_to] = x[:, self.local_from]
            for src, slots in self.remote_to.items():
                assembled[:, slots] = received[src]
        return self.apply(assembled, self.weight, self.bias, self.groups)


def mixing_step(name: str, apply, plan: SplitPlan, tensors: dict, rank: int, out_layout, transport: TransportDtype,
                in_shape: tuple[int, ...]):
    kind = GroupedMixingStep if plan.conv_groups > 1 else MixingStep
    return kind(name, apply, plan, tensors, rank, out_layout, transport, tuple(in_shape))
