"""`disco` command line: one sub-command per module in this package, imported only when that command is used."""
from __future__ import annotations

import argparse
import importlib
import sys

from disco.cli import COMMAND_HELP
from disco.errors import DiscoError


def build_parser(command: str | None = None, *, every: bool = True) -> argparse.ArgumentParser:
    """The whole parser (every command's options), or, with every=False, only `command`'s options in full and the
    other commands as names with their help: `disco --help` and `disco run ...` then import nothing they do not
    need (torchvision and the training stack take seconds to import)."""
    parser = argparse.ArgumentParser(
        prog="disco",
        description="DISCO: split a vision model across N devices and send only a small, learned subset of "
                    "channels between them.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMAND_HELP.items():
        if every or name == command:
            importlib.import_module(f"disco.cli.{name}_cmd").add_parser(sub)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def _command_in(argv: list[str]) -> str | None:
    """The sub-command named on the command line (the first word that is not an option), if any."""
    return next((word for word in argv if not word.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_command_in(argv), every=False).parse_args(argv)
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
