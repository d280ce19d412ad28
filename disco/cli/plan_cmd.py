"""`disco plan`: predicted latency of a deployment (or of a model split N ways) on a topology, and its critical path."""
from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from disco.cli import COMMAND_HELP, MODEL_SPECS
from disco.cli.arguments import weights_argument
from disco.transport import TRANSPORT_DTYPES

if TYPE_CHECKING:  # torch-free --help: the costs module is read only for its type
    from disco.accounting.costs import ExpectedCosts


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "plan", help=COMMAND_HELP["plan"],
        description="Predict per-image latency (batch 1) and images/s of a split model on the devices and links "
                    "a topology describes (measured by `disco probe`, or written by hand: docs/method.md 11), from "
                    "the exact bytes each layer sends between each pair of nodes and the MACs each node does, with "
                    "the runtime's overlap (sends posted before the local part is computed). Prints where the time "
                    "goes: the critical path's nodes, links and layers.")
    parser.add_argument("deployment", nargs="?", help="a deployment folder (manifest.json); or give --model")
    parser.add_argument("--topology", required=True, help="topology.json: one entry per node, rank 0 first")
    parser.add_argument("--budget", type=float, help="a deployment carrying several budgets: predict this one")
    parser.add_argument("--model", help=f"instead of a deployment: {MODEL_SPECS}, split --nodes ways (untrained: "
                                        "groups kept at random to --keep)")
    parser.add_argument("--nodes", type=int, default=2, help="with --model: devices to split across (default 2)")
    parser.add_argument("--node-weights", type=weights_argument, metavar="W,W,...",
                        help="with --model: each node's share of the work, e.g. 2,1")
    parser.add_argument("--input-size", default="3,224,224", help="with --model: one input's C,H,W")
    parser.add_argument("--keep", type=_fraction, default=1.0,
                        help="with --model: fraction of communication groups kept (default 1: the dense split)")
    parser.add_argument("--dtype", default="fp32", choices=tuple(TRANSPORT_DTYPES), help="with --model: transport")
    parser.add_argument("--json", action="store_true", help="print the prediction as JSON")
    parser.set_defaults(handler=run)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}")
    return value


def cost_report_of(args: argparse.Namespace) -> "ExpectedCosts":
    from disco.errors import DiscoError

    if (args.deployment is None) == (args.model is None):
        raise DiscoError("give a deployment folder or --model (one of them)")
    model_only = [flag for flag, given in (("--node-weights", args.node_weights is not None),
                                           ("--keep", args.keep != 1.0)) if given]
    if args.deployment is not None and model_only:
        raise DiscoError(f"{', '.join(model_only)} apply to --model; a deployment's split and masks are its own")
    if args.model is not None and args.budget is not None:
        raise DiscoError("--budget picks one of a deployment's budgets; with --model, use --keep")
    if args.deployment is not None:
        from disco.export.manifest import Manifest

        manifest = Manifest.load(args.deployment)
        return manifest.expected_at(manifest.level_of(args.budget))
    import torch

    from disco.accounting import cost_report
    from disco.models import build_model, parse_input_size
    from disco.split.masks import keep_random_groups
    from disco.split.partitioner import partition

    example = torch.zeros(1, *parse_input_size(args.input_size))
    simulated = partition(build_model(args.model).eval(), nodes=args.nodes, example_inputs=example,
                          node_weights=args.node_weights)
    if args.keep < 1.0:
        keep_random_groups(simulated, args.keep, seed=0)
    return cost_report(simulated, example, transport_dtype=args.dtype).expected()


def print_prediction(prediction, title: str) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    console = Console() if sys.stdout.isatty() else Console(width=160)
    console.print(f"[bold]{title}[/bold]: {prediction.latency_s * 1e3:,.1f} ms per image; up to "
                  f"{prediction.images_per_s:,.1f} images/s with images in flight (bound by {prediction.bottleneck})")
    console.print("compute per image: " + ", ".join(f"node {k} {s * 1e3:,.1f} ms"
                                                    for k, s in enumerate(prediction.compute_s_per_node)))
    places = Table(title="critical path by place")
    places.add_column("where")
    places.add_column("ms", justify="right")
    places.add_column("share", justify="right")
    for where, seconds in prediction.by_place().items():
        places.add_row(where, f"{seconds * 1e3:,.2f}", f"{seconds / prediction.latency_s:.0%}")
    console.print(places)
    layers = Table(title="longest pieces of the critical path")
    for column in ("layer", "where", "ms"):
        layers.add_column(column, justify="right" if column == "ms" else "left", overflow="fold")
    for segment in prediction.by_layer():
        layers.add_row(segment.layer, segment.where, f"{segment.seconds * 1e3:,.2f}")
    console.print(layers)


def run(args: argparse.Namespace) -> int:
    from disco.planning.latency import predict
    from disco.topology import Topology

    topology = Topology.load(args.topology)
    report = cost_report_of(args)
    prediction = predict(report, topology)
    if args.json:
        print(json.dumps(prediction.as_dict(), indent=1))
    else:
        print_prediction(prediction, args.deployment or f"{args.model} on {report.nodes} nodes")
    return 0
