"""Where a rank's time goes (`disco run --profile DIR`): per step of its program, seconds computing, seconds
waiting for peers and bytes sent, summed over the runs; every rank's times gathered on rank 0 into one table.

Each rank also records a torch.profiler trace (DIR/rankK.trace.json: open it in https://ui.perfetto.dev or
chrome://tracing) in which every graph node and every wait for a peer is a named span. Rank 0 writes
DIR/layers.json and DIR/layers.md: per step, each rank's compute and wait, and the steps that set the pace
(the slowest rank's compute, summed over steps, is what the run would take if nothing waited on the network).
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from disco.runtime.comm import Comm, gather

FIELDS = ("compute_s", "wait_s", "bytes_sent")
TABLE_ROWS = 15


@dataclass
class StepProfile:
    """Sums over profiled runs, per step of one rank's program (names in program order)."""

    names: list[str]
    kinds: list[str]
    totals: torch.Tensor  # [len(FIELDS), steps] float64
    runs: int = 0

    @classmethod
    def for_steps(cls, steps, names: list[str]) -> "StepProfile":
        """`names`: each step's name in the table and the traces (a layer call's: its layer)."""
        return cls(list(names), [type(s).__name__ for s in steps],
                   torch.zeros(len(FIELDS), len(steps), dtype=torch.float64))

    @contextmanager
    def step(self, index: int, comm: Comm):
        """Time one step: wall time less the time spent in comm waits is compute."""
        began, waited, sent = time.perf_counter(), comm.waited_s, comm.sent_total()
        with torch.profiler.record_function(self.names[index]):
            yield
        wait = comm.waited_s - waited
        self.totals[:, index] += torch.tensor([time.perf_counter() - began - wait, wait,
                                               comm.sent_total() - sent], dtype=torch.float64)


def gather_profiles(comm: Comm, profile: StepProfile) -> torch.Tensor | None:
    """Rank 0: [ranks, FIELDS, steps] per-run means of every rank (all run the same program graph)."""
    mean = profile.totals / max(1, profile.runs)
    gathered = gather(comm, mean, "collecting profiles")
    return None if gathered is None else torch.stack(gathered)


def pace_table(names: list[str], kinds: list[str], per_rank: torch.Tensor) -> dict:
    """The table rank 0 writes: per step each rank's compute, wait and bytes (ms, per run), the steps sorted by
    the slowest rank's compute, and the lockstep sum (sum over steps of the slowest rank's compute)."""
    compute, wait, sent = per_rank[:, 0] * 1e3, per_rank[:, 1] * 1e3, per_rank[:, 2]
    slowest = compute.max(dim=0).values
    order = torch.argsort(slowest, descending=True).tolist()
    steps = [{"step": names[i], "kind": kinds[i], "compute_ms": compute[:, i].tolist(), "wait_ms": wait[:, i].tolist(),
              "bytes_sent": sent[:, i].tolist()} for i in order]
    return {"ranks": per_rank.shape[0], "lockstep_compute_ms": float(slowest.sum()),
            "compute_ms_per_rank": compute.sum(dim=1).tolist(), "wait_ms_per_rank": wait.sum(dim=1).tolist(),
            "steps_by_slowest_compute": steps}


def write_tables(folder: Path, table: dict, latency_ms: float | None) -> Path:
    table = {**table, "median_latency_ms": latency_ms}
    (folder / "layers.json").write_text(json.dumps(table, indent=1))
    ranks = range(table["ranks"])
    lines = [f"# Where the time goes ({table['ranks']} ranks, per run)", "",
             f"- median latency: {latency_ms:.2f} ms" if latency_ms is not None else "- median latency: -",
             f"- lockstep compute (sum over steps of the slowest rank's compute): "
             f"{table['lockstep_compute_ms']:.2f} ms",
             "- per rank: " + "; ".join(f"rank {r} computes {table['compute_ms_per_rank'][r]:.2f} ms, waits "
                                        f"{table['wait_ms_per_rank'][r]:.2f} ms" for r in ranks), "",
             "| step | kind | " + " | ".join(f"rank {r} compute / wait (ms) | rank {r} bytes" for r in ranks) + " |",
             "|---|---|" + "---|---|" * table["ranks"]]
    for row in table["steps_by_slowest_compute"][:TABLE_ROWS]:
        cells = " | ".join(f"{row['compute_ms'][r]:.2f} / {row['wait_ms'][r]:.2f} | {row['bytes_sent'][r]:,.0f}"
                           for r in ranks)
        lines.append(f"| {row['step']} | {row['kind']} | {cells} |")
    path = folder / "layers.md"
    path.write_text("\n".join(lines) + "\n")
    return path
