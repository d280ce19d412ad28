"""`disco bench NAME [ARGS...]`: run one of the benchmarks in bench/ (they write docs/results/)."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from disco.errors import DiscoError
from disco.cli import COMMAND_HELP

BENCHMARKS = {  # how long each takes is said once, in the script's own --help
    "accounting": "bytes, MACs and memory of ResNet-50 split on 2 and 4 nodes",
    "tradeoff": "accuracy vs bytes per image on Fashion-MNIST: learned, random, no communication",
    "quantized": "accuracy vs bytes per image with fp16/bf16/int8/int4 messages, trained for and not",
    "latency": "real distributed latency, unshaped and on tc-shaped links (root for shaping and CPU quotas)",
    "rank_breakdown": "where a 2-node deployment's time goes: compute alone, exchanges alone, both",
}


def bench_folder() -> Path:
    return Path(__file__).resolve().parents[2] / "bench"


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bench", help=COMMAND_HELP["bench"],
        description="Run a benchmark script from the source checkout's bench/ folder: "
                    + "; ".join(f"{name}: {text}" for name, text in BENCHMARKS.items())
                    + ". Arguments after the name go to the script (e.g. --quick; --help says how long it takes).")
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="passed to the benchmark script")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    script = bench_folder() / f"{args.name}.py"
    if not script.is_file():
        raise DiscoError(f"{script} not found: benchmarks ship with the source checkout, not the installed package")
    return subprocess.call([sys.executable, str(script), *args.arguments])
