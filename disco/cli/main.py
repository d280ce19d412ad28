"""`disco` command line: one sub-command per module in this package."""
from __future__ import annotations

import argparse
import sys

from disco.cli import bench_cmd, export_cmd, inspect_cmd, keygen_cmd, run_cmd, train_cmd
from disco.errors import DiscoError

COMMANDS = (inspect_cmd, train_cmd, export_cmd, run_cmd, bench_cmd, keygen_cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="disco",
        description="DISCO: split a vision model across N devices and send only a small, learned subset of "
                    "channels between them.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except (DiscoError, FileNotFoundError) as error:
        print(f"disco {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a training run can be continued from its last checkpoint
        print(f"disco {args.command}: interrupted" + (" (continue with --resume)" if args.command == "train" else ""),
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
