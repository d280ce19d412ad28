"""One rank of a distributed run: `torchrun --nproc-per-node N -m disco.runtime DEPLOY --input ...`.

Shards are verified against the manifest before the process group is joined, and every rank checks that all
hold the same manifest. Rank 0 reads the input (refusing a bad one before anything is sent) and coordinates
(evaluation.py); the other ranks serve batches until it says stop (roles.py); both speak protocol.py. Errors
end the rank at once with one line naming the cause (and the peer, for a dead or hung one); nothing waits
forever.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch

from disco.fields import add_options, from_args
from disco.errors import DiscoError
from disco.files import write_text_atomically
from disco.export.manifest import MANIFEST_NAME, Manifest, sha256_of
from disco.export.signing import verify_deployment
from disco.runtime.comm import DistComm, choose_backend, launch_environment
from disco.runtime.evaluation import coordinate
from disco.runtime.inputs import eval_batches, file_batches
from disco.runtime.options import RunOptions
from disco.runtime.orphans import end_with_launcher
from disco.runtime.levels import load_programs
from disco.runtime.profiling import gather_profiles, pace_table, write_tables
from disco.runtime.protocol import gather_counters
from disco.runtime.roles import Coordinator, serve
from disco.runtime.serving import answer_requests
from disco.runtime.link import connect_from_environment
from disco.runtime.summary import print_summary, summarise
from disco.tasks.registry import get_task


# the largest message rank 0 accepts from `disco serve` (a batch of inputs): the front end bounds its batches far
# below this; it only keeps a broken front end from making rank 0 allocate without limit
LINK_MAX_BYTES = 1 << 31


def _batches(manifest: Manifest, options: RunOptions):
    """Rank 0's input, read and checked before any communication."""
    if options.eval:
        collate = get_task(manifest.task).objective.collate
        return eval_batches(manifest, options.batch_size, options.limit, collate)
    return file_batches(options.input, manifest, options.batch_size)


def pin_to_own_cores() -> None:
    """Keep this rank on its share of the host's cores (threads started later inherit it): ranks that migrate
    across cores, or share one, slow each other down (measured: ResNet-50 on 2 ranks, 2 cores, 122 -> 103 ms).
    Nothing is done when the host has fewer cores than local ranks."""
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    cores = sorted(os.sched_getaffinity(0))
    share = len(cores) // max(1, local_world)
    if share >= 1 and local_world > 1:
        os.sched_setaffinity(0, cores[local_rank * share:(local_rank + 1) * share])


def run_rank(options: RunOptions) -> dict | None:
    if options.pin_cores:
        pin_to_own_cores()
    rank, world = launch_environment()
    folder = Path(options.deploy)
    if options.verify_key is not None:  # before reading anything else of the folder
        verify_deployment(folder, options.verify_key)
    manifest = Manifest.load(folder)
    get_task(manifest.task)  # an unknown task is refused before anything runs
    if world != manifest.nodes:
        raise DiscoError(f"the deployment is split across {manifest.nodes} nodes but {world} ranks were started")
    backend, device = choose_backend(options.backend)
    # shard verified before any talk; one program per budget the deployment carries
    programs = load_programs(manifest, folder, rank, device, options.model_code, options.budget)
    batches = _batches(manifest, options) if rank == 0 and not options.serve else None
    link = connect_from_environment(LINK_MAX_BYTES) if rank == 0 and options.serve else None
    comm = DistComm.start(timeout=options.timeout, backend=backend, device=device)
    comm.agree_on(sha256_of(folder / MANIFEST_NAME), "manifest")
    mode = f"inflight={options.inflight} serve={options.serve}"
    comm.agree_on(hashlib.sha256(mode.encode()).hexdigest(), "--inflight and --serve")
    if rank == 0 and not options.quiet:
        print(f"ready: {world} ranks joined ({backend}), shards and manifest verified", flush=True)
    with _profiled(programs, options.profile, rank, device), torch.no_grad():
        if rank != 0:
            result = serve(programs, comm, options.inflight)
        elif link is not None:
            result = answer_requests(Coordinator(programs, comm, options.inflight), manifest, link, backend)
        else:
            result = coordinate(Coordinator(programs, comm, options.inflight), manifest, options, batches)
    counters = gather_counters(comm)
    pace = _gather_pace(programs, comm) if options.profile else None
    comm.close()
    if rank != 0:
        return None
    summary = summarise(result, counters, manifest, comm.world, backend, programs.default)
    if pace is not None:
        summary["profile"] = str(write_tables(Path(options.profile), pace, _median_ms(summary)))
    return summary


@contextmanager
def _profiled(program, folder: str | None, rank: int, device: torch.device):
    """With --profile: time every step (program.start_profiling) and record a torch.profiler trace."""
    if folder is None:
        yield
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    program.start_profiling()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as recorder:
        yield
    recorder.export_chrome_trace(str(Path(folder) / f"rank{rank}.trace.json"))


def _gather_pace(program, comm) -> dict | None:
    per_rank = gather_profiles(comm, program.profile)
    return None if per_rank is None else pace_table(program.profile.names, program.profile.kinds, per_rank)


def _median_ms(summary: dict) -> float | None:
    median = summary["latency_s"]["median"]
    return None if median is None else median * 1e3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m disco.runtime", description=(
        "One rank of a distributed DISCO run (start it with torchrun, or use `disco run`)."))
    add_options(parser, RunOptions)
    return parser


def report_failure(rank: str, error: Exception, verbose: bool, command: str = "disco run") -> None:
    """One line naming the rank and the cause (the traceback too with --verbose), then leave at once: tearing
    down a broken process group could wait on the dead peer. Exit 2: bad input or a peer; 1: anything else."""
    if verbose:
        traceback.print_exc()
    cause = str(error) if isinstance(error, DiscoError) else f"{type(error).__name__}: {error}"
    hint = "" if verbose or isinstance(error, DiscoError) else " (--verbose shows the traceback)"
    print(f"{command}: rank {rank}: error: {cause.splitlines()[0] if cause else type(error).__name__}{hint}",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(2 if isinstance(error, (DiscoError, FileNotFoundError)) else 1)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = os.environ.get("RANK", "?")
    end_with_launcher(rank)
    try:
        summary = run_rank(from_args(RunOptions, args))
        if summary is not None and args.summary:
            write_text_atomically(Path(args.summary), json.dumps(summary, indent=1), "--summary")
    except Exception as error:  # noqa: BLE001 - every failure ends the rank with one line naming it
        report_failure(rank, error, args.verbose, "disco serve" if args.serve else "disco run")
    if summary is not None:
        if not args.quiet:
            print_summary(summary)
    return 0
