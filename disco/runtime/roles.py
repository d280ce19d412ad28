"""What rank 0 and the other ranks do per batch, both through the protocol (protocol.py)."""
from __future__ import annotations

import time

import torch

from disco.errors import DiscoError
from disco.runtime.comm import Comm
from disco.runtime.protocol import REFUSED, RUN, STOP, run_batch, share_status


class Coordinator:
    """Rank 0: starts each batch, runs its part, assembles the output, times each forward."""

    def __init__(self, program, comm: Comm):
        self.program, self.comm = program, comm
        self.latencies: list[float] = []
        self.images = 0

    def forward(self, x: torch.Tensor, timed: bool = True):
        start = time.perf_counter()
        x = x.to(self.comm.device)
        share_status(self.comm, RUN, x.shape[0])
        output = run_batch(self.program, self.comm, x, x.shape[0], self.program.transport)
        if self.comm.device.type == "cuda":
            torch.cuda.synchronize()
        if timed:
            self.latencies.append(time.perf_counter() - start)
        self.images += x.shape[0]
        return output

    def stop(self, status: int = STOP) -> None:
        share_status(self.comm, status, 0)


def serve(program, comm: Comm) -> None:
    """Ranks other than 0: run every batch rank 0 starts until it says stop."""
    while True:
        status, batch = share_status(comm)
        if status == STOP:
            return
        if status == REFUSED:
            raise DiscoError("rank 0 refused the input (see its error); stopping")
        run_batch(program, comm, None, batch, program.transport)
