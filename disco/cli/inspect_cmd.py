"""`disco inspect`: how a model splits across N nodes and what each node sends, computes and stores."""
from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING


from disco.transport import TRANSPORT_DTYPES
from disco.cli import COMMAND_HELP, MODEL_SPECS
from disco.cli.arguments import weights_argument

if TYPE_CHECKING:  # rich is imported when a table is drawn, not for --help
    from disco.accounting.costs import CostReport
    from rich.table import Table


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "inspect", help=COMMAND_HELP["inspect"],
        description="Partition a model across N nodes and print, per image, the bytes each node sends, the "
                    "MACs and parameter/activation memory per node, next to the dense split (every channel sent).")
    parser.add_argument("--model", required=True, help=MODEL_SPECS)
    parser.add_argument("--model-kwargs", type=_kwargs, default={}, metavar="K=V,...",
                        help="arguments for the model's builder, e.g. width_mult=0.5 (torchvision), drop_rate=0 "
                             "(timm), or a transformers config's image_size=96,num_hidden_layers=6")
    parser.add_argument("--nodes", type=int, default=2, help="number of devices to split across (default 2)")
    parser.add_argument("--node-weights", type=weights_argument, metavar="W,W,...",
                        help="each node's share of the work, e.g. 2,1,1 (default: equal); the summary shows how "
                             "close each node's MACs and parameters come to its share")
    parser.add_argument("--input-size", default="3,224,224", help="one input's shape C,H,W (default 3,224,224)")
    parser.add_argument("--dtype", default="fp32", choices=tuple(TRANSPORT_DTYPES),
                        help="dtype activations cross the network in (default fp32)")
    parser.add_argument("--keep-random", type=float, metavar="FRACTION",
                        help="keep only a random fraction of communication groups (to see the effect of masks)")
    parser.add_argument("--seed", type=int, default=0, help="seed for --keep-random (default 0)")
    parser.add_argument("--topology", help="topology.json (disco probe, or by hand): also predict the latency "
                                           "per image on it and show where the time goes (as disco plan does)")
    parser.add_argument("--json", action="store_true", help="print the full cost report as JSON")
    parser.add_argument("--verbose", action="store_true", help="also print one row per channel-mixing layer")
    parser.set_defaults(handler=run)


def _kwargs(text: str) -> dict:
    from disco.fields import parse_kwargs
    try:
        return parse_kwargs(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _mb(value: float) -> str:
    return f"{value / 1e6:,.2f} MB"


def _gmacs(value: float) -> str:
    return f"{value / 1e9:,.3f} G"


def _summary_table(report: "CostReport", title: str, weights: tuple[float, ...] | None) -> "Table":
    from rich.table import Table

    from disco.accounting.report import share_over_weight

    table = Table(title=title)
    table.add_column("per image")
    for k in range(report.nodes):
        table.add_column(f"node {k}", justify="right")
    table.add_column("total", justify="right")

    def row(label, values, fmt):
        table.add_row(label, *(fmt(v) for v in values), fmt(sum(values)))
    traffic, macs, memory = report.traffic, report.compute.macs_per_node, report.memory
    row("sent (this split)", [sum(r) for r in traffic.bytes_matrix], _mb)
    row("sent (dense split)", [sum(r) for r in traffic.dense_bytes_matrix], _mb)
    row("MACs", macs, _gmacs)
    row("parameters", memory.param_bytes_per_node, _mb)
    row("activations (peak)", memory.activation_bytes_per_node, _mb)
    row("memory", memory.memory_bytes_per_node, _mb)
    table.add_row("MACs / weight share", *(f"{r:.2f}x" for r in share_over_weight(macs, weights)), "")
    table.add_row("params / weight share",
                  *(f"{r:.2f}x" for r in share_over_weight(memory.param_bytes_per_node, weights)), "")
    return table


def _layer_table(report: "CostReport") -> "Table":
    from rich.table import Table

    table = Table(title="channel-mixing layers")
    for column in ("layer", "type", "in", "out", "elems/channel", "groups kept", "bytes", "dense bytes"):
        # whole layer names, never "layer1.…": wrapped if they must be, on a terminal or in a file
        table.add_column(column, justify="left" if column in ("layer", "type") else "right", overflow="fold",
                         no_wrap=column != "layer")
    for layer in report.layers:
        table.add_row(layer.name, layer.type, str(layer.in_channels), str(layer.out_channels),
                      str(layer.elements_per_channel), f"{layer.groups_kept}/{layer.groups_total}",
                      f"{layer.bytes:,}", f"{layer.dense_bytes:,}")
    return table


def _fallback_table(report: "CostReport") -> "Table":
    from rich.table import Table

    table = Table(title="data moved where no rule splits an operation as its operands lie (fallbacks)")
    for column in ("graph node", "operation", "runs on", "bytes", "MACs", "why"):
        table.add_column(column, justify="right" if column in ("bytes", "MACs") else "left", overflow="fold")
    for entry in report.fallbacks:
        runs_on = "its nodes" if entry.executor is None else f"node {entry.executor}"
        table.add_row(entry.graph_node, entry.op or "(layout change)", runs_on, f"{entry.bytes:,}",
                      f"{entry.macs:,}", entry.reason)
    return table


def _print(report: "CostReport", args: argparse.Namespace) -> None:
    import sys

    from rich.console import Console

    # piped or redirected output has no terminal width to fit: give rows room rather than cut them
    console = Console() if sys.stdout.isatty() else Console(width=200)
    if args.verbose:
        console.print(_layer_table(report))
    traffic = report.traffic
    console.print(_summary_table(report, f"{args.model} on {report.nodes} nodes, input {args.input_size}, "
                                         f"{traffic.transport_dtype} transport", args.node_weights))
    model_macs, model_params = report.compute.model_macs, report.memory.model_param_bytes
    console.print(f"communication: {traffic.bytes:,} of {traffic.dense_bytes:,} dense bytes per image "
                  f"(ratio {traffic.ratio:.3f}); groups kept {traffic.groups_kept:,}/{traffic.groups_total:,}")
    console.print(f"whole model on one device: {_gmacs(model_macs)}MACs, {_mb(model_params)} parameters; "
                  f"largest node does {max(report.compute.macs_per_node) / model_macs:.1%} of the MACs")
    console.print(f"input scattered from node 0: {traffic.io_bytes.input:,} B; output gathered on node 0: "
                  f"{traffic.io_bytes.output:,} B (reported apart, same for every split)")
    console.print(f"partial sums of norms and reductions over split channels: {traffic.norm_bytes:,} B; data moved "
                  f"by fallbacks: {traffic.fallback_bytes:,} B ({len(report.fallbacks)} operations"
                  f"{', listed below' if report.fallbacks else ''}; both fp32, reported apart)")
    if report.fallbacks:
        console.print(_fallback_table(report))


def run(args: argparse.Namespace) -> int:
    # torch, torch.fx and torchvision: only when a model is inspected, not for --help
    import torch

    from disco.accounting import cost_report
    from disco.models import build_model, parse_input_size
    from disco.split.masks import keep_random_groups
    from disco.split.partitioner import partition

    size = parse_input_size(args.input_size)
    model = build_model(args.model, **args.model_kwargs).eval()
    example = torch.zeros(1, *size)
    simulated = partition(model, nodes=args.nodes, example_inputs=example, node_weights=args.node_weights)
    if args.keep_random is not None:
        keep_random_groups(simulated, args.keep_random, seed=args.seed)
    report = cost_report(simulated, example, transport_dtype=args.dtype)
    prediction = _prediction(report, args.topology)
    if args.json:
        print(json.dumps({**report.to_json(), **({"prediction": prediction.as_dict()} if prediction else {})},
                         indent=1))
    else:
        _print(report, args)
        if prediction is not None:
            from disco.cli.plan_cmd import print_prediction

            print_prediction(prediction, f"predicted on {args.topology}")
    return 0


def _prediction(report: "CostReport", topology: str | None):
    if topology is None:
        return None
    from disco.planning.latency import predict
    from disco.topology import Topology

    return predict(report.expected(), Topology.load(topology))
