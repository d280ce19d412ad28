"""Which images each process trains on at each optimiser step, whatever the number of processes.

The unit is the optimiser step's *global batch* (`--batch-size`): each epoch shuffles the training set from the
epoch's seed and cuts it into global batches in order (the last one smaller). A step's global batch is computed
as P = processes x accumulation micro-batches, micro-batch m holding its images m, m + P, m + 2P, ...; process r
computes micro-batches r, r + W, r + 2W, ... one after the other, accumulating gradients, and the processes'
gradients are averaged (DistributedDataParallel). Each micro-batch's mean loss is weighted by its share of the
global batch (size x W / global size), so a step's gradient is exactly the gradient of the global batch's mean
loss, and the images of each micro-batch (which BatchNorm normalises together) depend only on P: two processes
train exactly as one process accumulating two micro-batches (tests/test_data_parallel.py). Steps per epoch do
not depend on the processes at all, so a run resumes with another world size on the same schedule.

A last global batch with fewer images than micro-batches is filled up from the start of the epoch's order, so
that no micro-batch is empty.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import Sampler

from disco.errors import DiscoError


@dataclass(frozen=True)
class BatchLayout:
    """images: the training set's size; batch: the global batch; world: processes; micro: images one process
    computes at once (at most; None: batch / world)."""

    images: int
    batch: int
    world: int = 1
    micro: int | None = None

    def __post_init__(self) -> None:
        if self.images < 1:
            raise DiscoError("the training set is empty")
        if self.batch < 1 or self.world < 1:
            raise DiscoError(f"--batch-size and the number of processes must be at least 1 ({self.batch}, "
                             f"{self.world})")
        if self.micro is not None and self.micro < 1:
            raise DiscoError(f"--micro-batch must be at least 1, got {self.micro}")
        if self.batch < self.world:
            raise DiscoError(f"--batch-size {self.batch} is smaller than the {self.world} processes: each process "
                             "needs at least one image per step")
        if self.parts > self.batch:
            raise DiscoError(f"--batch-size {self.batch} over {self.world} processes in micro-batches of at most "
                             f"{self.micro} would leave micro-batches empty: give a batch size divisible by the "
                             "processes, or a larger --micro-batch")

    @property
    def accumulation(self) -> int:
        """Micro-batches each process accumulates per step."""
        per_process = math.ceil(self.batch / self.world)
        return math.ceil(per_process / self.micro) if self.micro else 1

    @property
    def parts(self) -> int:
        """Micro-batches per step over all processes (P)."""
        return self.world * self.accumulation

    @property
    def steps(self) -> int:
        """Optimiser steps per epoch (independent of the processes)."""
        return math.ceil(self.images / self.batch)

    def global_batches(self, seed: int) -> list[list[int]]:
        """The epoch's global batches (image indices), in step order."""
        order = torch.randperm(self.images, generator=torch.Generator().manual_seed(seed)).tolist()
        batches = [order[start:start + self.batch] for start in range(0, self.images, self.batch)]
        short = self.parts - len(batches[-1])
        if short > 0:  # every micro-batch gets an image: fill from the epoch's start (cycling if the set is tiny)
            batches[-1] = batches[-1] + [order[i % len(order)] for i in range(short)]
        return batches

    def micro_batches(self, batch: list[int], rank: int) -> list[list[int]]:
        """Process `rank`'s micro-batches of one global batch, in the order it computes them."""
        parts = [batch[m::self.parts] for m in range(self.parts)]
        return [parts[j * self.world + rank] for j in range(self.accumulation)]

    def weight(self, micro_size: int, batch_size: int) -> float:
        """What a micro-batch's mean loss is multiplied by, so that the processes' averaged gradients are the
        global batch's mean loss's."""
        return micro_size * self.world / batch_size


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch as the training loop sees it: its images, the weight of its mean loss, its random seed."""

    size: int
    weight: float
    seed: int


class StepSampler(Sampler[list[int]]):
    """A DataLoader batch sampler: process `rank`'s micro-batches, step after step, for the epoch set by
    `set_seed` (each epoch reseeds it: the order depends on nothing else)."""

    def __init__(self, layout: BatchLayout, rank: int = 0):
        if not 0 <= rank < layout.world:
            raise DiscoError(f"rank {rank} is outside a world of {layout.world}")
        self.layout, self.rank, self.seed = layout, rank, 0
        self._epoch: tuple[int, list[list[int]]] | None = None  # (seed, its global batches): read twice an epoch

    def set_seed(self, seed: int) -> None:
        self.seed = seed

    def _global_batches(self) -> list[list[int]]:
        """The epoch's global batches, shuffled once per seed (the loader and the training loop both read them)."""
        if self._epoch is None or self._epoch[0] != self.seed:
            self._epoch = (self.seed, self.layout.global_batches(self.seed))
        return self._epoch[1]

    def steps(self) -> Iterator[list[MicroBatch]]:
        """For each step of the epoch: this process's micro-batches (their images come from the loader)."""
        layout = self.layout
        for step, batch in enumerate(self._global_batches()):
            parts = layout.micro_batches(batch, self.rank)
            yield [MicroBatch(len(part), layout.weight(len(part), len(batch)),
                              self._seed_of(step, j * layout.world + self.rank)) for j, part in enumerate(parts)]

    def _seed_of(self, step: int, part: int) -> int:
        """The random state of micro-batch `part` of `step` (dropout...): the same wherever it is computed."""
        return (self.seed * 1_000_003 + step * self.layout.parts + part) % 2**62

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._global_batches():
            yield from self.layout.micro_batches(batch, self.rank)

    def __len__(self) -> int:
        return self.layout.steps * self.layout.accumulation


class ShardSampler(Sampler[int]):
    """Evaluation: process `rank` scores images rank, rank + W, ... (each image once; the metric sums over the
    processes)."""

    def __init__(self, size: int, world: int = 1, rank: int = 0):
        self.size, self.world, self.rank = size, world, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world))
