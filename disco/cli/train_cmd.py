"""`disco train`: train a model to a communication budget (dense -> sparsify -> fine-tune with distillation).

Its options are TrainConfig's fields (disco.fields), plus --resume and --device, which are not part of
a run's configuration.
"""
from __future__ import annotations

import argparse

from disco.fields import add_options, from_args
from disco.errors import DiscoError
from disco.training.config import TrainConfig
from disco.cli import COMMAND_HELP


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train", help=COMMAND_HELP["train"],
        description="Train (or load) the dense model, learn which channels to send until the bytes per image "
                    "fit the budget, then fine-tune with masks frozen and distillation from the dense model. "
                    "Writes config.json, metrics.jsonl, checkpoints, dense.safetensors, disco.safetensors and "
                    "report.md/report.json into --out. On several GPUs or hosts, start it with torchrun "
                    "(torchrun --nproc-per-node G -m disco train ...): data-parallel, rank 0 writes --out.")
    add_options(parser, TrainConfig)
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last checkpoint, with its saved options (other "
                             "options are ignored); the folder may have been moved or copied")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available; under torchrun each process takes the "
                                          "GPU of its LOCAL_RANK)")
    parser.set_defaults(handler=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    if not args.model:
        raise DiscoError("--model is required (unless --resume)")
    return from_args(TrainConfig, args)


def run(args: argparse.Namespace) -> int:
    from disco.training.pipeline import resume, train
    if args.resume:  # the run's own options, from the folder given (wherever it was moved or copied)
        resume(args.out, device=args.device)
    else:
        train(config_from_args(args), device=args.device)
    return 0
