"""`disco export RUN --out DIR`: per-node shards and a manifest from a trained run."""
from __future__ import annotations

import argparse

from disco.cli import COMMAND_HELP
from disco.transport import TRANSPORT_DTYPES


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export", help=COMMAND_HELP["export"],
        description="Write one safetensors shard per node (only the weights that node computes with) and "
                    "manifest.json (model spec, channel plan of every layer, transport dtype, sha256 of every "
                    "shard) into --out, from a run folder of `disco train`.")
    parser.add_argument("run_folder", metavar="RUN", help="run folder of `disco train` (holds disco.safetensors)")
    parser.add_argument("--out", required=True, help="deployment folder to write, e.g. deploy/NAME")
    parser.add_argument("--dtype", choices=tuple(TRANSPORT_DTYPES),
                        help="transport dtype of activations between nodes (default: the run's, which it was trained "
                             "for; another one is measured on the run's test images and the change printed)")
    parser.add_argument("--budget", type=float, metavar="B",
                        help="a run trained with --nested: export the masks of this one of its budgets (default: "
                             "the run's --budget, the smallest)")
    parser.add_argument("--budgets", metavar="B,B,...|all",
                        help="a run trained with --nested: one deployment carrying several of its budgets (all: "
                             "every one); `disco run --budget B` and `disco serve` (?budget=B per request) switch "
                             "between them with no reloading. Default budget: the run's own --budget")
    parser.add_argument("--sign-key", metavar="PRIVATE_KEY",
                        help="sign the deployment with this Ed25519 private key (`disco keygen`): `disco run "
                             "--verify-key PUBLIC_KEY` then refuses any folder not signed by its owner")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from disco.export.signing import SIGNATURE_NAME
    from disco.training.export_run import export_run  # the training stack: only when exporting

    from disco.errors import DiscoError

    budgets = None
    if args.budgets is not None:
        try:
            budgets = [] if args.budgets.strip() == "all" else [float(b) for b in args.budgets.split(",")]
        except ValueError:
            raise DiscoError(f"--budgets takes budgets like 0.2,0.1 or 'all', got {args.budgets!r}") from None
    manifest = export_run(args.run_folder, args.out, transport_dtype=args.dtype, sign_key=args.sign_key,
                          budget=args.budget, budgets=budgets)
    nested = manifest.budgets()
    if nested is None:
        expected = manifest.expected_at(0)
        print(f"exported {manifest.nodes} shards of {manifest.model.model} to {args.out}: "
              f"{expected.bytes:,} bytes per image between nodes ({manifest.transport_dtype}, "
              f"ratio {expected.ratio:.3f} of the dense split)")
    else:
        print(f"exported {manifest.nodes} shards of {manifest.model.model} to {args.out}, carrying "
              f"{len(nested.budgets)} budgets (`disco run --budget B`, `disco serve` ?budget=B):")
        for level, budget in enumerate(nested.budgets):
            expected = manifest.expected_at(level)
            print(f"  budget {budget}{' (default)' if level == nested.default else ''}: {expected.bytes:,} bytes "
                  f"per image between nodes ({manifest.transport_dtype}, ratio {expected.ratio:.3f} of the dense "
                  "split)")
    for node, shard in enumerate(manifest.shards):
        print(f"  node {node}: {shard['file']}  sha256 {shard['sha256'][:16]}...")
    if args.sign_key:
        print(f"  signed: {SIGNATURE_NAME} (check with `disco run {args.out} --verify-key PUBLIC_KEY ...`)")
    return 0
