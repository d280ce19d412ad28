"""Validated options for partitioning (one dataclass, keyword-only)."""
from __future__ import annotations

from dataclasses import dataclass

from disco.errors import DiscoError

MAX_NODES = 64


@dataclass(frozen=True, kw_only=True)
class PartitionOptions:
    """How to split a model.

    nodes: number of devices the model is split across (1..64).
    assignment: how channels produced by a channel-mixing layer are given to nodes by default.
        "balanced" gives node k the contiguous block [k*C/N, (k+1)*C/N) (sizes differ by at most one).
    transport_dtype: the dtype channels cross the network in (disco/transport.py: fp32, fp16, bf16, int8, int4);
        the simulation rounds received channels as the network will.
    """

    nodes: int
    assignment: str = "balanced"
    transport_dtype: str = "fp32"

    def __post_init__(self) -> None:
        if isinstance(self.nodes, bool) or not isinstance(self.nodes, int):
            raise DiscoError(f"nodes must be an integer, got {self.nodes!r}")
        if not 1 <= self.nodes <= MAX_NODES:
            raise DiscoError(f"nodes must be between 1 and {MAX_NODES}, got {self.nodes}")
        if self.assignment != "balanced":
            raise DiscoError(f"unknown assignment {self.assignment!r}; known: 'balanced'")
        from disco.transport import get_transport_dtype  # here: disco.options is read by light imports too

        get_transport_dtype(self.transport_dtype)

