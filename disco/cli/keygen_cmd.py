"""`disco keygen --out DIR`: an Ed25519 key pair for signing deployments."""
from __future__ import annotations

import argparse

from disco.cli import COMMAND_HELP


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "keygen", help=COMMAND_HELP["keygen"],
        description="Write an Ed25519 key pair into --out: disco-sign.key (private, readable by you only: sign "
                    "with `disco export RUN --out DIR --sign-key disco-sign.key`) and disco-sign.pub (give it to "
                    "the hosts: `disco run DIR --verify-key disco-sign.pub ...` refuses folders not signed with "
                    "the private key). Existing keys are never overwritten.")
    parser.add_argument("--out", required=True, help="folder for the two key files")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from disco.export.signing import generate_keys  # torch (via the manifest): only when keys are made

    private_path, public_path = generate_keys(args.out)
    print(f"private key (keep it secret): {private_path}\npublic key (copy to the hosts): {public_path}")
    return 0
