"""`disco train`: train a model to a communication budget (dense -> sparsify -> fine-tune with distillation)."""
from __future__ import annotations

import argparse
import ast

from disco.errors import DiscoError
from disco.sparsify.sparsifier import METHODS
from disco.tasks.predictions import TASKS
from disco.training.config import TrainConfig
from disco.transport import TRANSPORT_DTYPES


def _kwargs(text: str) -> dict:
    """'width_mult=0.5,dropout=0.1' -> {'width_mult': 0.5, 'dropout': 0.1} (Python literals only)."""
    result = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise DiscoError(f"--model-kwargs item {item!r} must look like name=value")
        try:
            result[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            result[key.strip()] = value.strip()
    return result


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train", help="train a model to a communication budget",
        description="Train (or load) the dense model, learn which channels to send until the bytes per image "
                    "fit the budget, then fine-tune with masks frozen and distillation from the dense model. "
                    "Writes config.json, metrics.jsonl, checkpoints, dense.safetensors, disco.safetensors and "
                    "report.md/report.json into --out.")
    parser.add_argument("--model", help="torchvision:NAME or path/to/file.py:factory (required unless --resume)")
    parser.add_argument("--model-kwargs", default="", type=_kwargs, metavar="K=V,...",
                        help="keyword arguments for the model builder, e.g. width_mult=0.5")
    parser.add_argument("--stem-stride", type=int, help="stride of the first conv (e.g. 1 for 28x28 images)")
    parser.add_argument("--task", default="classification", choices=TASKS,
                        help="what the model predicts (default classification); segmentation, detection and "
                             "superres use disco:fcn_resnet18, disco:retinanet_resnet18 and disco:edsr style models")
    parser.add_argument("--dataset", help="built-in dataset: fashion-mnist (classification, superres), "
                                          "fashion-scenes (segmentation, detection), photos (superres)")
    parser.add_argument("--data", help="your own data: an ImageFolder (train/, val/) for classification, a VOC folder "
                                       "(segmentation), a COCO folder (detection) or a folder of images (superres)")
    parser.add_argument("--image-size", type=int,
                        help="resize --data images to this square size (fashion-scenes: the canvas side, default 96)")
    parser.add_argument("--nodes", type=int, default=2, help="devices to split across (default 2)")
    parser.add_argument("--budget", type=float, default=0.2,
                        help="bytes allowed, as a fraction of the dense split's (0..1; 0 = no communication; "
                             "default 0.2 = 5x less)")
    parser.add_argument("--method", default="learned", choices=METHODS,
                        help="how groups are chosen: learned (DISCO) or random (baseline)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each phase unless set below (default 2)")
    parser.add_argument("--dense-epochs", type=int, help="epochs training the dense model")
    parser.add_argument("--sparsify-epochs", type=int, help="epochs driving masks to the budget")
    parser.add_argument("--finetune-epochs", type=int, help="epochs fine-tuning with frozen masks")
    parser.add_argument("--weights", help="dense weights to start from (.safetensors); skips dense training")
    parser.add_argument("--dense-run", help="a previous run folder whose dense.safetensors to start from")
    parser.add_argument("--no-distill", dest="distill", action="store_false",
                        help="fine-tune with cross-entropy only (default: distil from the dense model)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step (default 128)")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate, cosine-decayed per phase")
    parser.add_argument("--sparse-lr-scale", type=float, default=1.0,
                        help="learning rate of the sparsify and fine-tune phases, as a fraction of --lr")
    parser.add_argument("--regularization", type=float, default=1e-4, help="bytes-weighted group lasso strength")
    parser.add_argument("--train-subset", type=int, help="train on only this many images (quick runs)")
    parser.add_argument("--test-subset", type=int, help="evaluate on only this many images")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, data order and random groups")
    parser.add_argument("--dtype", dest="transport_dtype", default="fp32", choices=tuple(TRANSPORT_DTYPES),
                        help="transport dtype the report counts bytes in")
    parser.add_argument("--out", required=True, help="run folder, e.g. runs/NAME")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.set_defaults(handler=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    if not args.model:
        raise DiscoError("--model is required (unless --resume)")
    per_phase = {f"{p}_epochs": getattr(args, f"{p}_epochs") if getattr(args, f"{p}_epochs") is not None
                 else args.epochs for p in ("dense", "sparsify", "finetune")}
    return TrainConfig(model=args.model, out=args.out, task=args.task, dataset=args.dataset, data=args.data,
                       model_kwargs=args.model_kwargs, stem_stride=args.stem_stride, nodes=args.nodes,
                       budget=args.budget, method=args.method, batch_size=args.batch_size, lr=args.lr,
                       sparse_lr_scale=args.sparse_lr_scale,
                       regularization=args.regularization, distill=args.distill, weights=args.weights,
                       dense_run=args.dense_run, seed=args.seed, train_subset=args.train_subset,
                       test_subset=args.test_subset, transport_dtype=args.transport_dtype,
                       image_size=args.image_size, **per_phase)


def run(args: argparse.Namespace) -> int:
    from disco.training.pipeline import train
    if args.resume:
        from pathlib import Path
        config = TrainConfig.load(Path(args.out) / "config.json")
    else:
        config = config_from_args(args)
    train(config, resume=args.resume, device=args.device)
    return 0
