"""The dtypes activations may cross the network in: the one table that accounting, training, export, the
runtime and the command line read (docs/method.md 2 and 8).

Float dtypes (fp32, fp16, bf16) are plain casts. Integer dtypes (int8, int4) are affine quantisation
(disco/quantization.py): each group of values travels as codes of `bits` bits plus its (low, step) pair in
float32. A group is one channel of one image when the channel has at least PER_CHANNEL_MIN_ELEMENTS elements per
image, else all the channels the sending node owns in that layer (one image): a 7x7 or 1x1 channel would
otherwise spend more bytes on its pair than on its values.

A message (one layer, one sender, one receiver, a batch) is one tensor: for floats [batch, channels, elements]
in the dtype; for integers [batch, bytes] of uint8, each image's pairs first, then its codes packed
8 // bits per byte. Its size per image is `message_bytes`, which is what the cost report counts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from disco.errors import DiscoError

PER_CHANNEL_MIN_ELEMENTS = 64  # below this, a channel's values share their sender's (low, step) pair
PAIR_BYTES = 8  # (low, step) as two float32


@dataclass(frozen=True)
class TransportDtype:
    """name: what users type (--dtype); bits per value on the wire; torch_dtype: the element type of a
    message (the float itself, or uint8 carrying integer codes); scheme: how the bytes are to be read, recorded
    in each manifest so that a runtime that reads them otherwise refuses the deployment."""

    name: str
    bits: int
    element: str  # torch dtype name of a message's elements (torch is imported only where tensors are made)
    scheme: str

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.element)

    @property
    def quantized(self) -> bool:
        return self.element == "uint8"

    @property
    def levels(self) -> int:
        """Largest code of an integer dtype (255 for int8, 15 for int4)."""
        return (1 << self.bits) - 1

    @property
    def lossless(self) -> bool:
        """Whether a value arrives exactly as it was sent (fp32: the simulation needs no rounding step)."""
        return self.element == "float32"

    def per_channel(self, elements_per_channel: int) -> bool:
        """Whether each channel carries its own (low, step) pair (integer dtypes only)."""
        return elements_per_channel >= PER_CHANNEL_MIN_ELEMENTS

    def message_bytes(self, channels: int, elements_per_channel: int) -> int:
        """Bytes per image of one message carrying `channels` channels of `elements_per_channel` values each."""
        if not channels:
            return 0
        values = channels * elements_per_channel
        if not self.quantized:
            return values * self.bits // 8
        pairs = channels if self.per_channel(elements_per_channel) else 1
        return pairs * PAIR_BYTES + math.ceil(values * self.bits / 8)

    def channel_bytes(self, elements_per_channel: int) -> float:
        """What one more sent channel costs per image: the budget's price of a communication group (a shared
        pair is paid once per message, not per channel, so it is left out here and counted by the report)."""
        pair = PAIR_BYTES if self.quantized and self.per_channel(elements_per_channel) else 0
        return elements_per_channel * self.bits / 8 + pair


TRANSPORT_DTYPES: dict[str, TransportDtype] = {d.name: d for d in (
    TransportDtype("fp32", 32, "float32", "cast"),
    TransportDtype("fp16", 16, "float16", "cast"),
    TransportDtype("bf16", 16, "bfloat16", "cast"),
    TransportDtype("int8", 8, "uint8", "affine-minmax-f32pair-v1"),
    TransportDtype("int4", 4, "uint8", "affine-minmax-f32pair-v1"),
)}


# the input scattered from node 0 and the outputs gathered on it travel as fp32 whatever the activations' dtype:
# every rank must compute on the very input the simulation sees
IO_DTYPE = TRANSPORT_DTYPES["fp32"]


def get_transport_dtype(name: str) -> TransportDtype:
    """The table's entry for `name`, with a clear error for unknown names."""
    if name not in TRANSPORT_DTYPES:
        raise DiscoError(f"unknown transport dtype {name!r}; known: {', '.join(TRANSPORT_DTYPES)}")
    return TRANSPORT_DTYPES[name]


def check_scheme(name: str, scheme: str | None) -> TransportDtype:
    """The dtype a manifest names, refused unless this version reads its bytes the way they were written."""
    dtype = get_transport_dtype(name)
    if scheme != dtype.scheme:
        raise DiscoError(f"the deployment's {name} messages use scheme {scheme!r}; this version of disco reads "
                         f"{name} as {dtype.scheme!r}: export the deployment again with this version")
    return dtype
