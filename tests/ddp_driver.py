"""One process of a data-parallel training run, as torchrun starts it, recording what tests/test_data_parallel.py
compares with a single-process run (the code under test has no hooks for this: it is wrapped here).

usage: python -m torch.distributed.run --standalone --nproc-per-node W tests/ddp_driver.py CONFIG.json RECORD_DIR
       [--stop-after-epochs N] [--resume]

CONFIG: TrainConfig fields (with out). Each rank writes into RECORD_DIR:
- rank{R}-steps.safetensors: every optimiser step's averaged gradient of all weights, flattened (step_K);
- rank{R}-masks.safetensors: the group masks of the trained model, as this rank holds them at the end.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import safetensors.torch
import torch

from disco.training import loops, pipeline
from disco.training.config import TrainConfig


def record_steps() -> dict[str, torch.Tensor]:
    """Wrap the training loop's optimiser step to keep each step's gradients (read by `save_steps`)."""
    steps: dict[str, torch.Tensor] = {}
    original = loops._optimizer_step

    def recording(optimizer, *args, **kwargs):
        grads = [p.grad.detach().reshape(-1) for group in optimizer.param_groups for p in group["params"]
                 if p.grad is not None]
        steps[f"step_{len(steps)}"] = torch.cat(grads).cpu().clone()
        return original(optimizer, *args, **kwargs)

    loops._optimizer_step = recording
    return steps


def record_masks(record: Path, rank: int) -> None:
    """Wrap the sparse phases to save the masks this rank ends with."""
    original = pipeline._sparse_phases

    def recording(run):
        simulated, sparsifier = original(run)
        masks = {name: layer.group_mask.detach().cpu().contiguous() for name, layer in sparsifier.layers.items()}
        safetensors.torch.save_file(masks, str(record / f"rank{rank}-masks.safetensors"))
        return simulated, sparsifier

    pipeline._sparse_phases = recording


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("record")
    parser.add_argument("--stop-after-epochs", type=int)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    rank, record = int(os.environ.get("RANK", "0")), Path(args.record)
    record.mkdir(parents=True, exist_ok=True)
    steps = record_steps()
    record_masks(record, rank)
    config = TrainConfig(**json.loads(Path(args.config).read_text()))
    try:
        if args.resume:
            pipeline.resume(config.out, stop_after_epochs=args.stop_after_epochs, device="cpu")
        else:
            pipeline.train(config, stop_after_epochs=args.stop_after_epochs, device="cpu")
    finally:
        if steps:
            safetensors.torch.save_file(steps, str(record / f"rank{rank}-steps.safetensors"))


if __name__ == "__main__":
    main()
