"""`disco probe DEPLOY --out topology.json`: measure the nodes' compute and the links between them, as the
deployment will use them, and write the topology (disco/topology.py) that `disco plan` and latency-budget
training read. The ranks' side is disco/runtime/probe.py; this module imports no torch (`--help` answers at once)."""
from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

from disco.cli import COMMAND_HELP
from disco.fields import add_options, from_args
from disco.runtime.options import ProbeOptions, check_out

DESCRIPTION = (
    "Start one process per node of the deployment with torchrun (as `disco run` does) and measure, with rank 0 "
    "writing the result to --out: "
    "(1) each node's compute: all ranks at once (ranks sharing a host slow each other down as they will in a run), "
    "on the deployment's own model with random weights and BatchNorms folded as the runtime folds them, at batch 1 "
    "and the rank's thread count: every conv/linear call is timed alone on its real input shape, and time = "
    "overhead + MACs / rate is fitted over them: layer_overhead_ms is that overhead, and gmac_per_s the whole "
    "forward's MACs over what it takes beyond those overheads (activations and pooling ride on the MACs). "
    "(2) each ordered pair of nodes, one pair at a time: the one-way delay (half the median round trip of a tiny "
    "message) and the bandwidth (float32 messages doubling from 256 KiB until one takes 0.1 s, at most 64 MiB). "
    "(3) two flows at once (0->1 and 2->3, or 0->1 and 1->0 with fewer than 4 nodes): on a switch they move twice "
    "what one flow moves; when "
    "together they move less than 1.5x, the nodes share one medium (Wi-Fi, one loopback) and shared_mbit_per_s "
    "records it. "
    "Takes about 20-30 s, most of it starting the ranks (the compute probe takes a few seconds per rank: 3 s "
    "for ResNet-50 at 224x224 on one core; the links about a second per pair). On several hosts run `torchrun "
    "--nnodes N --node-rank K --nproc-per-node 1 --rdzv-endpoint HOST:PORT -m disco.runtime.probe DEPLOY --out "
    "topology.json` on each instead (rank 0 writes the file).")


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("probe", help=COMMAND_HELP["probe"], description=DESCRIPTION)
    add_options(parser, ProbeOptions)
    parser.set_defaults(handler=run)


def rank_arguments(options: ProbeOptions) -> list[str]:
    """The options back as the ranks' command-line arguments (bool flags as disco.fields makes them)."""
    forwarded = [options.deploy]
    for f in dataclasses.fields(ProbeOptions):
        value = getattr(options, f.name)
        if f.name == "deploy" or value is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            forwarded += [] if value == f.default else [flag if value else "--no-" + f.name.replace("_", "-")]
        else:
            forwarded += [flag, str(value)]
    return forwarded


def run(args: argparse.Namespace) -> int:
    # torch (via the manifest) and torchrun: only when a probe starts, not for --help
    from disco.export.manifest import Manifest
    from disco.export.trust import model_to_build
    from disco.runtime.launch import rank_environment, relay_rank_output, torchrun_command

    options = from_args(ProbeOptions, args)
    manifest = Manifest.load(options.deploy)  # refused here, before any rank starts
    model_to_build(manifest.model, options.model_code)
    check_out(options.out)
    command = torchrun_command(options.deploy, manifest.nodes, [])
    module = command.index("disco.runtime")  # torchrun's options as `disco run` gives them; our module instead
    command = command[:module] + ["disco.runtime.probe"] + rank_arguments(options)
    process = subprocess.Popen(command, env=rank_environment(manifest.nodes, options.threads),
                               stderr=subprocess.PIPE, text=True, bufsize=1)
    rank_said_why = False
    for line in relay_rank_output(process.stderr, options.verbose):
        rank_said_why = rank_said_why or "disco probe: rank" in line
    code = process.wait()
    if code and not options.verbose and not rank_said_why:
        print(f"disco probe: a rank failed (exit code {code}) without saying why; run with --verbose for "
              "torchrun's report", file=sys.stderr)
    return code
