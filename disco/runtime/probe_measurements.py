"""What one rank of `disco probe` measured, as it travels to rank 0: a fixed-length float64 row (and its host name as
a fixed-length byte row), so that one gather (comm.py) collects every rank's."""
from __future__ import annotations

import socket
from dataclasses import dataclass

import torch

from disco.runtime.probe_compute import Compute

HOST_BYTES = 64  # a host name is sent cut or padded to this many bytes


@dataclass
class RankMeasurements:
    """One rank's compute (its rate and per-call overhead, and the fit and forward they came from) and its row of
    the link matrices: bytes/s and one-way delay (s) to each rank, its own entries inf and 0 (unused)."""

    compute: Compute
    bandwidth: list[float]
    delay: list[float]

    def to_tensor(self) -> torch.Tensor:
        """The row the gather moves: the compute's fields, then the bandwidths, then the delays."""
        c = self.compute
        return torch.tensor([c.macs_per_s, c.overhead_s, c.calls_rate, c.model_s, c.macs, c.calls,
                             *self.bandwidth, *self.delay], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, row: torch.Tensor) -> "RankMeasurements":
        """The measurements `to_tensor` made `row` of."""
        macs_per_s, overhead_s, calls_rate, model_s, macs, calls, *links = row.tolist()
        world = len(links) // 2
        compute = Compute(macs_per_s, overhead_s, calls_rate, model_s, int(macs), int(calls))
        return cls(compute, links[:world], links[world:])


def host_tensor() -> torch.Tensor:
    """This host's name as HOST_BYTES bytes."""
    name = socket.gethostname().encode()[:HOST_BYTES]
    return torch.tensor(list(name.ljust(HOST_BYTES, b"\0")), dtype=torch.uint8)


def host_name(data: torch.Tensor) -> str:
    """The host name `host_tensor` made `data` of."""
    return bytes(data.tolist()).rstrip(b"\0").decode(errors="replace")
