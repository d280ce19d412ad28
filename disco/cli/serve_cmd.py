"""`disco serve DEPLOY`: the deployment as a long-running HTTP service (FastAPI + uvicorn on rank 0's host)."""
from __future__ import annotations

import argparse

from disco.cli import COMMAND_HELP
from disco.fields import add_options, from_args
from disco.serve.options import ServeOptions


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "serve", help=COMMAND_HELP["serve"],
        description="Start one process per node with torchrun (as `disco run` does) and answer HTTP requests on "
                    "--host:--port: POST /v1/predict (an image -> the task's answer, batched), GET / (a page to try "
                    "it), /health, /ready, /v1/model, /metrics (Prometheus). Requests that cannot be answered get "
                    "an HTTP error with a JSON reason: overload 503, too large 413, not an image 415, a dead or "
                    "hung rank 503 naming it. The ranks trust each other: run them on a private network.")
    add_options(parser, ServeOptions)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from disco.serve.main import serve  # FastAPI, uvicorn and torch: only when the service starts

    return serve(from_args(ServeOptions, args))
