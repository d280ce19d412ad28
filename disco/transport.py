"""The dtypes activations may cross the network in: the one table that accounting, export, the runtime and
the command line read (docs/method.md 2)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from disco.errors import DiscoError


@dataclass(frozen=True)
class TransportDtype:
    """name: what users type (--dtype); torch_dtype: what the runtime casts sent channels to;
    bytes_per_element: what accounting counts; runtime: whether `disco run` can send it yet."""

    name: str
    torch_dtype: torch.dtype
    bytes_per_element: int
    runtime: bool


TRANSPORT_DTYPES: dict[str, TransportDtype] = {d.name: d for d in (
    TransportDtype("fp32", torch.float32, 4, runtime=True),
    TransportDtype("fp16", torch.float16, 2, runtime=True),
    TransportDtype("int8", torch.int8, 1, runtime=False),  # needs quantisation scales the runtime lacks yet
)}
RUNTIME_DTYPES = tuple(name for name, d in TRANSPORT_DTYPES.items() if d.runtime)


def get_transport_dtype(name: str, *, runtime: bool = False) -> TransportDtype:
    """The table's entry for `name`, with a clear error for unknown names (or, with runtime=True, for
    dtypes the runtime cannot send)."""
    known = RUNTIME_DTYPES if runtime else tuple(TRANSPORT_DTYPES)
    if name not in known:
        what = "the runtime sends" if runtime else "known transport dtypes:"
        raise DiscoError(f"unknown or unsupported transport dtype {name!r}; {what} {', '.join(known)}")
    return TRANSPORT_DTYPES[name]


def transport_bytes(name: str) -> int:
    """Bytes per element of a transport dtype."""
    return get_transport_dtype(name).bytes_per_element
