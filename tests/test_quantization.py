"""Quantised messages: what the runtime decodes is, bit for bit, what the simulation's rounding gives for the same
values (disco/quantization.py), in every dtype and layout, with the sizes the transport table states. Reference:
`round_trip` (the simulation's function) on the whole activation, and the documented byte layout."""
from __future__ import annotations

import math

import pytest
import torch

from disco.errors import DiscoError
from disco.quantization import MessageCodec, channel_major, round_trip
from disco.transport import TRANSPORT_DTYPES, get_transport_dtype

NODES = 3


def _activation(shape, channel_dim, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator) * torch.rand(shape[channel_dim], generator=generator).reshape(
        [-1 if d == channel_dim % len(shape) else 1 for d in range(len(shape))]) * 3
    owner = torch.randint(-1, NODES, (shape[channel_dim],), generator=generator)
    return x, owner


@pytest.mark.parametrize("dtype", list(TRANSPORT_DTYPES))
@pytest.mark.parametrize("shape, channel_dim", [((2, 12, 9, 9), 1), ((2, 12, 3, 3), 1), ((2, 7, 10), -1),
                                                ((3, 10), -1), ((1, 13, 3, 3), 1), ((1, 11, 9, 9), 1)])
def test_decoded_messages_equal_the_simulated_rounding_bit_for_bit(dtype, shape, channel_dim):
    transport = get_transport_dtype(dtype)
    x, owner = _activation(shape, channel_dim)
    x[0].select(channel_dim - 1 if channel_dim > 0 else channel_dim, 0).fill_(0.5)  # a constant channel (image 0)
    expected = channel_major(round_trip(x, transport, channel_dim, owner), channel_dim)
    for sender in range(NODES):
        held = ((owner == sender) | (owner == -1)).nonzero().flatten()
        own = (owner[held] == sender).nonzero().flatten()
        local = x.index_select(channel_dim, held)
        sent = {dst: (owner[held] == sender).nonzero().flatten()[dst::NODES] for dst in range(NODES) if dst != sender}
        sent = {dst: index for dst, index in sent.items() if index.numel()}
        codec = MessageCodec(transport, channel_dim, own, "test")
        elements = math.prod(shape) // (shape[0] * shape[channel_dim])
        for dst, message in codec.encode(local, sent).items():
            channels = sent[dst].numel()
            assert message.dtype == transport.torch_dtype
            assert message[0].numel() * message.element_size() == transport.message_bytes(channels, elements)
            decoded = codec.decode(message, channels, elements, torch.float32)
            assert torch.equal(decoded, expected[:, held[sent[dst]]])


def test_integer_codes_use_the_whole_range_and_keep_the_extremes():
    x = torch.linspace(-2, 6, 256).reshape(1, 1, 256)
    for dtype, levels in (("int8", 255), ("int4", 15)):
        rounded = round_trip(x, get_transport_dtype(dtype), 1, torch.zeros(1, dtype=torch.long))
        assert rounded.unique().numel() == levels + 1
        assert float(rounded.min()) == -2 and abs(float(rounded.max()) - 6) < 1e-5
        assert float((rounded - x).abs().max()) <= 8 / levels / 2 + 1e-6  # half a step at most


def test_small_channels_share_one_pair_per_message():
    transport = get_transport_dtype("int8")
    assert transport.message_bytes(10, 63) == 8 + 630 and transport.message_bytes(10, 64) == 10 * 8 + 640
    assert get_transport_dtype("int4").message_bytes(3, 3) == 8 + 5  # 9 codes: 4 bytes and a half, padded
    assert get_transport_dtype("bf16").message_bytes(3, 100) == 600


def test_straight_through_gradient_and_rounded_value():
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    y = round_trip(x, get_transport_dtype("int4"), 1, torch.tensor([0, 0, 1, 1]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert not torch.allclose(y.detach(), x.detach())


@pytest.mark.parametrize("dtype, poison", [("int8", float("nan")), ("int4", float("inf")), ("fp16", 1e6)])
def test_values_the_dtype_cannot_carry_are_refused(dtype, poison):
    x = torch.randn(1, 4, 8, 8)
    x[0, 1, 2, 3] = poison
    codec = MessageCodec(get_transport_dtype(dtype), 1, torch.arange(4), "layer conv")
    with pytest.raises(DiscoError, match="layer conv: .*NaN or Inf"):
        codec.encode(x, {1: torch.tensor([1, 2])})
