"""How long each phase trains and at what learning rate, counted in optimiser steps (docs/method.md 4).

Epochs are how a user thinks of training; steps are what the masks and the optimiser see. A 4,000-image dataset
at batch 128 is 32 steps per epoch: the cut schedule would then drop 87% of the bytes within one epoch, at the
full learning rate of a freshly restarted optimiser, and the model collapses to chance (measured: issue 17). So
each sparse phase (sparsify, fine-tune) runs at least `min_phase_steps` steps, repeating the data as needed
(whole epochs, so checkpoints and metrics stay per epoch), and its learning rate warms up linearly before the
cosine decay: AdamW restarted on a trained model takes its largest steps first, when its moment estimates are
still empty. The dense phase trains from scratch exactly as asked (cosine, no warm-up).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from disco.training.config import PHASES, TrainConfig


@dataclass(frozen=True)
class PhaseSchedule:
    """One phase as it runs: `epochs` passes over the training data of `steps_per_epoch` steps each."""

    phase: str
    epochs: int
    asked_epochs: int  # what the options asked for; epochs is more when the data is small
    steps_per_epoch: int
    lr: float
    warmup_steps: int

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def record(self) -> dict:
        """What metrics.jsonl and the report say about the phase."""
        return {**asdict(self), "steps": self.steps}

    def lr_factor(self, step: int) -> float:
        """Multiplier of `lr` after `step` optimiser steps: linear warm-up, then cosine to 0 at the last step."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        decay_steps = max(1, self.steps - self.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - self.warmup_steps) / decay_steps)))

    def scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)


def schedule_phase(config: TrainConfig, phase: str, steps_per_epoch: int) -> PhaseSchedule:
    """The phase's epochs, learning rate and warm-up for data of `steps_per_epoch` batches."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}")
    asked = config.phase_epochs(phase)
    if phase == "dense":
        return PhaseSchedule(phase, asked, asked, steps_per_epoch, config.lr, 0)
    epochs = max(asked, math.ceil(config.min_phase_steps / steps_per_epoch)) if asked else 0
    warmup = round(config.lr_warmup * epochs * steps_per_epoch)
    return PhaseSchedule(phase, epochs, asked, steps_per_epoch, config.lr * config.sparse_lr_scale, warmup)


def schedule_phases(config: TrainConfig, steps_per_epoch: int) -> dict[str, PhaseSchedule]:
    return {phase: schedule_phase(config, phase, steps_per_epoch) for phase in PHASES}
