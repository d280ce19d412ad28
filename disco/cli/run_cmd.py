"""`disco run DEPLOY --input IMAGE_OR_DIR | --eval`: distributed inference on N local processes."""
from __future__ import annotations

import argparse
import dataclasses

from disco.errors import DiscoError
from disco.fields import add_options
from disco.files import check_output_file
from disco.runtime.options import RunOptions
from disco.cli import COMMAND_HELP

LAUNCH_ONLY = ("nodes", "threads", "command", "handler")


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "run", help=COMMAND_HELP["run"],
        description="Start one process per node with torchrun. Each loads only its own shard (checked against "
                    "the manifest's sha256), and the ranks exchange exactly the planned channels. Prints "
                    "predictions (or accuracy with --eval), the median latency and the bytes each rank sent. "
                    "On several hosts run `torchrun --nnodes N --node-rank K --nproc-per-node 1 "
                    "--rdzv-endpoint HOST:PORT -m disco.runtime DEPLOY ...` on each instead.")
    add_options(parser, RunOptions)
    parser.add_argument("--nodes", type=int, help="processes to start (default: the deployment's node count)")
    parser.add_argument("--threads", type=int, help="CPU threads per process (default: cores / nodes)")
    parser.set_defaults(handler=run)


def worker_arguments(args: argparse.Namespace) -> list[str]:
    """The parsed options back as command-line arguments for every rank (flags as disco.fields makes them:
    `--name` turns a False default on, `--no-name` a True default off)."""
    defaults = {f.name: f.default for f in dataclasses.fields(RunOptions)}
    forwarded = []
    for key, value in vars(args).items():
        if key in LAUNCH_ONLY or key == "deploy" or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            forwarded += [] if value == defaults[key] else [flag if value else "--no-" + key.replace("_", "-")]
        else:
            forwarded += [flag, str(value)]
    return forwarded


def run(args: argparse.Namespace) -> int:
    from disco.runtime.launch import launch  # torch: only when a run starts, not for --help

    options = {k: v for k, v in vars(args).items() if k not in LAUNCH_ONLY}
    if options["serve"]:
        raise DiscoError("--serve is for the ranks `disco serve` starts: run `disco serve DEPLOY` instead")
    RunOptions(**options)  # validate here, before starting any process
    for flag, target in (("--save-output", args.save_output), ("--summary", args.summary)):
        if target is not None:
            check_output_file(target, flag)  # refused now, not after the whole run
    return launch(args.deploy, worker_arguments(args), nodes=args.nodes, threads=args.threads, verbose=args.verbose,
                  verify_key=args.verify_key, model_code=args.model_code, budget=args.budget)
