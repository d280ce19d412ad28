"""Argument types several commands share (argparse `type=`), light to import: `--help` loads no torch."""
from __future__ import annotations

import argparse


def weights_argument(text: str) -> tuple[float, ...]:
    from disco.options import parse_weights

    try:
        return parse_weights(text)
    except ValueError as error:  # DiscoError: argparse's one-line error, exit status 2
        raise argparse.ArgumentTypeError(str(error)) from None
