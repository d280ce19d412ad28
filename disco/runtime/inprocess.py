"""Every rank of a deployment in one process, one thread per rank, talking through in-memory queues
(MemoryComm): the same programs and protocol as a torchrun job, without processes or sockets. For tests and
for debugging a deployment on one machine; `disco run` is the real thing."""
from __future__ import annotations

import threading
from pathlib import Path

import torch

from disco.export.manifest import Manifest
from disco.runtime.comm import PeerFailure, memory_group
from disco.runtime.evaluation import join_batches
from disco.runtime.levels import build_programs
from disco.runtime.deployment_graph import DeploymentGraph
from disco.runtime.program import load_shard
from disco.runtime.protocol import gather_counters
from disco.runtime.roles import Coordinator, serve


def run_in_process(folder: str | Path, inputs: torch.Tensor, *, batch_size: int | None = None,
                   timeout: float = 60.0, model_code: str | Path | None = None, inflight: int = 1,
                   budget: float | None = None, budgets: list[float | None] | None = None
                   ) -> tuple[object, dict[str, list[list[int]]]]:
    """(outputs of the whole batch, bytes sent per category as [src][dst]) of the deployment in `folder`.
    `inputs` are split into batches of `batch_size` (default: one batch); outputs are concatenated.
    `inflight`: batches in flight at once (each rank runs that many lanes, as `disco run --inflight`).
    `model_code`: the model file of a deployment whose model is not registered (as `disco run --model-code`).
    `budget`: a deployment carrying several budgets: the one to run at (as `disco run --budget`); `budgets`: one
    per batch instead (switching between batches, as `disco serve` does per request)."""
    folder = Path(folder)
    manifest = Manifest.load(folder)
    shards = [load_shard(manifest, folder, rank) for rank in range(manifest.nodes)]
    graph = DeploymentGraph(manifest, shards[0], model_code)  # the same for every rank: built once
    programs = [build_programs(manifest, shards[rank], rank, torch.device("cpu"), model_code, budget, graph)
                for rank in range(manifest.nodes)]
    chunks = inputs.split(batch_size or len(inputs))
    if budgets is not None and len(budgets) != len(chunks):
        raise ValueError(f"{len(chunks)} batches but {len(budgets)} budgets")
    levels = [None if b is None else manifest.level_of(b) for b in budgets] if budgets else [None] * len(chunks)
    comms = memory_group(manifest.nodes, timeout)
    results: dict = {}
    errors: dict[int, BaseException] = {}

    def coordinate() -> None:
        coordinator = Coordinator(programs[0], comms[0], inflight)
        futures = [coordinator.submit(chunk, level=level) for chunk, level in zip(chunks, levels)]
        results["outputs"] = [future.result() for future in futures]
        coordinator.stop()
        results["counters"] = gather_counters(comms[0])

    def work(rank: int) -> None:
        serve(programs[rank], comms[rank], inflight)
        gather_counters(comms[rank])

    def guarded(rank: int, body, *args) -> None:
        try:
            with torch.no_grad():
                body(*args)
        except BaseException as error:  # reported to the caller below, the root cause (lowest rank) first
            errors[rank] = error

    threads = [threading.Thread(target=guarded, args=(0, coordinate), daemon=True)]
    threads += [threading.Thread(target=guarded, args=(rank, work, rank), daemon=True)
                for rank in range(1, manifest.nodes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:  # the root cause: a rank's own failure rather than its peers' reports of it, then the lowest rank
        raise min(errors.items(), key=lambda item: (isinstance(item[1], PeerFailure), item[0]))[1]
    return join_batches(results["outputs"]), results["counters"]
