"""The runtime's wire protocol: every message of a batch, in one place (docs/method.md 8).

Each function is called by every rank; rank 0 and the other ranks play the two sides of one message:
1. `share_status`: rank 0 tells every rank what comes next (RUN a batch of n images at budget level k, STOP,
   REFUSED input, or,
   under `disco serve`, COUNTERS: `gather_counters` now, or KEEPALIVE: nothing yet, rank 0 is still there: an
   idle service is not a hung rank 0);
2. `scatter_input`: rank 0 sends the batch to every rank as float32 (whatever the activations' transport dtype:
   every rank computes on the input the simulation sees), posted, then completed while rank 0 computes its part;
3. the layers' own exchanges (mixing.py, norm.py) while each rank runs its program;
4. `gather_output`: every rank sends rank 0 the output elements it owns (float32); rank 0 assembles the output;
5. `gather_counters` (once, at the end): every rank's bytes sent, per category and destination, on rank 0
   (and with --profile, `profiling.gather_profiles`: every rank's per-step times).
`run_batch` is steps 2-4 for one batch, used alike by rank 0 and the others.
"""
from __future__ import annotations

import torch

from disco.runtime.comm import CATEGORIES, Comm, Exchange, gather
from disco.transport import IO_DTYPE as IO_TRANSPORT

IO_DTYPE = IO_TRANSPORT.torch_dtype  # the input and outputs on the wire (disco/transport.py says why)

RUN, STOP, REFUSED, COUNTERS, KEEPALIVE = 1, 0, 2, 3, 4


def _others(comm: Comm) -> list[int]:
    return [k for k in range(comm.world) if k != comm.rank]


def share_status(comm: Comm, status: int = RUN, batch: int = 0, level: int = 0) -> tuple[int, int, int]:
    """(status, batch size, budget level) as rank 0 sets it; the arguments are read on rank 0 only. The level
    picks the program of a deployment carrying several budgets (disco/runtime/levels.py; 0 otherwise)."""
    if comm.rank == 0:
        header = torch.tensor([status, batch, level], dtype=torch.int64)
        comm.exchange({k: header for k in _others(comm)}, {}, category="control", what="sending work").wait()
        return status, batch, level
    status, batch, level = comm.receive((3,), torch.int64, 0, what="waiting for work from rank 0").tolist()
    return status, batch, level


def scatter_input(comm: Comm, x: torch.Tensor | None, shape: tuple[int, ...]) -> tuple[torch.Tensor, Exchange | None]:
    """The batch on every rank. Rank 0 passes it and gets back the sends still in flight (wait on them after
    computing); the others receive a tensor of `shape`."""
    if comm.rank == 0:
        sends = {k: x.to(IO_DTYPE) for k in _others(comm)}
        return x, comm.exchange(sends, {}, category="input", what="sending the input")
    return comm.receive(shape, IO_DTYPE, 0, what="receiving the input"), None


def gather_output(comm: Comm, program, local):
    """Rank 0: the whole output, assembled from every rank's owned elements; the others: None."""
    part = program.output_part(local)
    if comm.rank != 0:
        if part.shape[1]:
            comm.send(part.to(IO_DTYPE), 0, category="output", what="sending the output")
        return None
    batch = part.shape[0]
    receives = {k: ((batch, n), IO_DTYPE) for k in _others(comm) if (n := program.output_elements(k))}
    parts = comm.exchange({}, receives, category="control", what="gathering the output").wait()
    return program.assemble_output({0: part, **parts})


def run_batch(program, comm: Comm, x: torch.Tensor | None, batch: int):
    """Scatter, compute with the layers' exchanges, gather: the output on rank 0, None elsewhere."""
    shape = (batch, *program.manifest.input_shape)
    x, scatter = scatter_input(comm, x, shape)
    local = program.forward(x, comm)
    if scatter is not None:
        scatter.wait()
    return gather_output(comm, program, local)


def gather_counters(comm: Comm) -> dict[str, list[list[int]]] | None:
    """Rank 0: every rank's bytes sent per category as [src][dst]; the others: None."""
    mine = torch.tensor([comm.sent[c] for c in CATEGORIES], dtype=torch.int64)
    gathered = gather(comm, mine, "collecting byte counts")
    if gathered is None:
        return None
    table = torch.stack(gathered)  # [src, category, dst]
    return {c: table[:, i].tolist() for i, c in enumerate(CATEGORIES)}
