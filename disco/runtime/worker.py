"""One rank of a distributed run: `torchrun --nproc-per-node N -m disco.runtime DEPLOY --input ...`.

Shards are verified against the manifest before the process group is joined, and every rank checks that all
hold the same manifest. Rank 0 reads the input (refusing a bad one before anything is sent) and coordinates
(evaluation.py); the other ranks serve batches until it says stop (roles.py); both speak protocol.py. Errors
end the rank at once with one line naming the cause (and the peer, for a dead or hung one); nothing waits
forever.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import torch

from disco.fields import add_options, from_args
from disco.errors import DiscoError
from disco.export.manifest import MANIFEST_NAME, Manifest, sha256_of
from disco.export.signing import verify_deployment
from disco.runtime.comm import DistComm, choose_backend, launch_environment
from disco.runtime.evaluation import coordinate
from disco.runtime.inputs import eval_batches, file_batches
from disco.runtime.options import RunOptions
from disco.runtime.program import load_program
from disco.runtime.protocol import gather_counters
from disco.runtime.roles import Coordinator, serve
from disco.runtime.summary import print_summary, summarise
from disco.tasks.registry import get_task


def _batches(manifest: Manifest, options: RunOptions):
    """Rank 0's input, read and checked before any communication."""
    if options.eval:
        collate = get_task(manifest.task).objective.collate
        return eval_batches(manifest, options.batch_size, options.limit, collate)
    return file_batches(options.input, manifest, options.batch_size)


def run_rank(options: RunOptions) -> dict | None:
    rank, world = launch_environment()
    folder = Path(options.deploy)
    if options.verify_key is not None:  # before reading anything else of the folder
        verify_deployment(folder, options.verify_key)
    manifest = Manifest.load(folder)
    get_task(manifest.task)  # an unknown task is refused before anything runs
    if world != manifest.nodes:
        raise DiscoError(f"the deployment is split across {manifest.nodes} nodes but {world} ranks were started")
    backend, device = choose_backend(options.backend)
    program = load_program(manifest, folder, rank, device, options.model_code)  # shard verified before any talk
    batches = _batches(manifest, options) if rank == 0 else None
    comm = DistComm.start(timeout=options.timeout, backend=backend, device=device)
    comm.agree_on(sha256_of(folder / MANIFEST_NAME), "manifest")
    if rank != 0:
        serve(program, comm)
        gather_counters(comm)
        comm.close()
        return None
    if not options.quiet:
        print(f"ready: {world} ranks joined ({backend}), shards and manifest verified", flush=True)
    with torch.no_grad():
        result = coordinate(Coordinator(program, comm), manifest, options, batches)
    summary = summarise(result, gather_counters(comm), manifest, comm.world, backend)
    comm.close()
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m disco.runtime", description=(
        "One rank of a distributed DISCO run (start it with torchrun, or use `disco run`)."))
    add_options(parser, RunOptions)
    return parser


def _fail(rank: str, error: Exception, verbose: bool) -> None:
    """One line naming the rank and the cause (the traceback too with --verbose), then leave at once: tearing
    down a broken process group could wait on the dead peer. Exit 2: bad input or a peer; 1: anything else."""
    if verbose:
        traceback.print_exc()
    cause = str(error) if isinstance(error, DiscoError) else f"{type(error).__name__}: {error}"
    hint = "" if verbose or isinstance(error, DiscoError) else " (--verbose shows the traceback)"
    print(f"disco run: rank {rank}: error: {cause.splitlines()[0] if cause else type(error).__name__}{hint}",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(2 if isinstance(error, (DiscoError, FileNotFoundError)) else 1)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = os.environ.get("RANK", "?")
    try:
        summary = run_rank(from_args(RunOptions, args))
    except Exception as error:  # noqa: BLE001 - every failure ends the rank with one line naming it
        _fail(rank, error, args.verbose)
    if summary is not None:
        if args.summary:
            Path(args.summary).write_text(json.dumps(summary, indent=1))
        if not args.quiet:
            print_summary(summary)
    return 0
