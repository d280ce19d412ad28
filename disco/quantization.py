"""What sent channels look like after the trip: the rounding of a transport dtype (disco/transport.py) applied
to values, and the messages that carry them. The simulation and the runtime call the same functions, so a
received value equals the simulation's bit for bit whenever the sent value does.

Values are handled channel-major, [batch, channels, elements] (elements: H*W, or tokens); `channel_major` and
`from_channel_major` convert from and to a layer's own layout (channels at dim 1 for convs, last for linears).
Integer dtypes: code = clamp(round((v - low) / step), 0, levels), value = code * step + low, with low = the
group's minimum and step = (maximum - low) / levels (1 when the group is constant: every code is 0).
"""
from __future__ import annotations

import torch

from disco.errors import DiscoError
from disco.transport import PAIR_BYTES, TransportDtype


def channel_major(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """[batch, channels, elements] view (or copy, for channels-last layouts such as a linear's tokens)."""
    moved = x.movedim(channel_dim, 1)
    return moved.reshape(moved.shape[0], moved.shape[1], -1)


def from_channel_major(values: torch.Tensor, like_shape: tuple[int, ...], channel_dim: int) -> torch.Tensor:
    """`values` [batch, channels, elements] back in the layout of a tensor shaped `like_shape` (channel count
    taken from `values`)."""
    shape = list(like_shape)
    channels_at = channel_dim % len(shape)
    shape[channels_at] = values.shape[1]
    moved = [shape[0], shape[channels_at]] + [s for d, s in enumerate(shape) if d not in (0, channels_at)]
    return values.reshape(moved).movedim(1, channels_at)


def group_ranges(values: torch.Tensor, owner: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) [batch, channels] of each value's group: its own channel, or every channel of the same owner
    (owner: [channels] node of each channel; channels of owner -1, replicated data, are never sent)."""
    if per_channel:
        return torch.aminmax(values, dim=-1)
    low = torch.zeros(values.shape[:2], dtype=values.dtype, device=values.device)
    high = torch.zeros_like(low)
    for node in owner.unique().tolist():
        if node < 0:
            continue
        channels = (owner == node).nonzero().flatten().to(values.device)
        chosen = values.index_select(1, channels)
        low[:, channels] = chosen.amin(dim=(1, 2))[:, None]
        high[:, channels] = chosen.amax(dim=(1, 2))[:, None]
    return low, high


def _pairs(low: torch.Tensor, high: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    step = (high - low) / levels
    return low, torch.where(step > 0, step, torch.ones_like(step))


def _codes(values: torch.Tensor, low: torch.Tensor, step: torch.Tensor, levels: int) -> torch.Tensor:
    # one new tensor, then in place: the same arithmetic as (v - low) / step, rounded, clamped
    return values.sub(low[..., None]).div_(step[..., None]).round_().clamp_(0, levels)


def _values(codes: torch.Tensor, low: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """codes (float, a tensor of its own: overwritten) -> code * step + low."""
    return codes.mul_(step[..., None]).add_(low[..., None])


def round_trip(x: torch.Tensor, dtype: TransportDtype, channel_dim: int, owner: torch.Tensor) -> torch.Tensor:
    """x as its receivers get it (every channel, as if each were sent). With autograd on, the rounding is a
    straight-through estimator: the forward value is rounded, the gradient passes unchanged."""
    if dtype.lossless:
        return x
    if not dtype.quantized:
        rounded = x.detach().to(dtype.torch_dtype).to(x.dtype)
    else:
        values = channel_major(x.detach(), channel_dim)
        low, step = _pairs(*group_ranges(values, owner, dtype.per_channel(values.shape[-1])), dtype.levels)
        rounded = from_channel_major(_values(_codes(values, low, step, dtype.levels), low, step), x.shape,
                                     channel_dim)
    return x + (rounded - x).detach() if x.requires_grad else rounded


class MessageCodec:
    """One layer's messages on one rank: `encode` the channels it sends each receiver, `decode` what arrives.
    `own`: positions, among the rank's held channels, of the channels it owns (a shared pair covers them all)."""

    def __init__(self, dtype: TransportDtype, channel_dim: int, own: torch.Tensor, what: str):
        self.dtype, self.channel_dim, self.own, self.what = dtype, channel_dim, own, what

    def encode(self, x: torch.Tensor, sends: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """x: the rank's held channels in the layer's layout; sends: {dst: positions among them} -> {dst: message}."""
        dtype, messages, shared = self.dtype, {}, None
        for dst, index in sends.items():
            chosen = channel_major(x.index_select(self.channel_dim, index), self.channel_dim)
            if not dtype.quantized:
                messages[dst] = chosen.to(dtype.torch_dtype)
                if not dtype.lossless and not bool(torch.isfinite(messages[dst]).all()):
                    self._not_finite()
                continue
            per_channel = dtype.per_channel(chosen.shape[-1])
            if per_channel:
                low, step = self._pair(*torch.aminmax(chosen, dim=-1))
            else:
                shared = shared or self._shared_pair(x)
                low, step = (p.expand(-1, index.numel()) for p in shared)
            messages[dst] = self._pack(_codes(chosen, low, step, dtype.levels), low, step, per_channel)
        return messages

    def _shared_pair(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        owned = x.index_select(self.channel_dim, self.own.to(x.device)).reshape(x.shape[0], -1)
        return self._pair(*torch.aminmax(owned, dim=1, keepdim=True))

    def _pair(self, low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not bool(torch.isfinite(low).all() and torch.isfinite(high).all()):
            self._not_finite()
        return _pairs(low, high, self.dtype.levels)

    def _pack(self, codes: torch.Tensor, low: torch.Tensor, step: torch.Tensor, per_channel: bool) -> torch.Tensor:
        batch = codes.shape[0]
        pairs = torch.stack([low, step], -1) if per_channel else torch.stack([low[:, :1], step[:, :1]], -1)
        pair_bytes = pairs.to(torch.float32).reshape(batch, -1).contiguous().view(torch.uint8)
        codes = codes.reshape(batch, -1)
        if self.dtype.bits == 4:
            codes = codes.to(torch.uint8)
            if codes.shape[1] % 2:
                codes = torch.cat([codes, codes.new_zeros(batch, 1)], dim=1)
            codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
        message = torch.empty((batch, pair_bytes.shape[1] + codes.shape[1]), dtype=torch.uint8, device=codes.device)
        message[:, :pair_bytes.shape[1]] = pair_bytes
        message[:, pair_bytes.shape[1]:] = codes  # float codes are whole numbers in [0, 255]: exact as uint8
        return message

    def message_shape(self, batch: int, channels: int, elements: int) -> tuple[int, ...]:
        if not self.dtype.quantized:
            return (batch, channels, elements)
        return (batch, self.dtype.message_bytes(channels, elements))

    def decode(self, message: torch.Tensor, channels: int, elements: int, out_dtype: torch.dtype) -> torch.Tensor:
        """A message from one peer -> its values, [batch, channels, elements] in `out_dtype` (channel-major:
        `from_channel_major` puts them back in the layer's layout)."""
        dtype = self.dtype
        if not dtype.quantized:
            return message.to(out_dtype)
        batch = message.shape[0]
        pairs = channels if dtype.per_channel(elements) else 1
        # a copy of its own: a row slice of a received buffer may not start at a float boundary
        raw = message[:, :pairs * PAIR_BYTES].clone(memory_format=torch.contiguous_format).view(torch.float32)
        raw = raw.reshape(batch, pairs, 2)
        codes = message[:, pairs * PAIR_BYTES:]
        if dtype.bits == 4:
            codes = torch.stack([codes & 15, codes >> 4], dim=-1).reshape(batch, -1)[:, :channels * elements]
        low, step = raw[..., 0].expand(batch, channels), raw[..., 1].expand(batch, channels)
        return _values(codes.reshape(batch, channels, elements).to(torch.float32), low, step).to(out_dtype)

    def _not_finite(self):
        raise DiscoError(f"{self.what}: the activation to send holds NaN or Inf values (or values beyond "
                         f"{self.dtype.name}'s range); {self.dtype.name} cannot carry them. Check the input and the "
                         "model's weights")
