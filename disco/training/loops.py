"""One epoch of training and one evaluation pass, with progress on a terminal and in logs (disco/progress.py).

Both work for every task: the task's Objective (disco.tasks.objectives; each task module defines its own)
gives the loss, the distillation term and the test metric.
"""
from __future__ import annotations

import contextlib
import math
import re
import warnings
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from disco.progress import Progress
from disco.sparsify import Sparsifier
from disco.split.modules import running_norms
from disco.training.batches import StepSampler
from disco.training.data_parallel import DataParallel
from disco.training.precision import MixedPrecision
from disco.tasks.classification import ClassificationObjective
from disco.tasks.objectives import Objective

# loss_fn(outputs, targets, inputs) -> loss (inputs let a distillation loss query its teacher)
LossFn = Callable[[object, object, torch.Tensor], torch.Tensor]


def train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler, loss_fn: LossFn, *, device: torch.device,
                desc: str, objective: Objective, sparsifier: Sparsifier | None = None,
                precision: MixedPrecision | None = None, parallel: DataParallel | None = None) -> dict:
    """Returns the epoch's mean training loss over all processes (and accuracy, for classification; and the ratio
    reached). `loader` draws its batches with a StepSampler (disco/training/batches.py): each optimiser step is
    this process's micro-batches of the step's global batch, their gradients accumulated (and averaged over the
    processes by DDP when `model` is wrapped: `parallel`). `precision`: autocast and loss scaling
    (disco/training/precision.py; default fp32)."""
    precision = precision or MixedPrecision("fp32", device)
    parallel = parallel or DataParallel(device=device)
    model.train()
    totals = [0.0, 0.0, 0.0]  # loss x images, correct, images
    classifying = objective.metric_name == "accuracy"
    batches = iter(loader)
    bar = Progress(None, desc, total=loader.batch_sampler.layout.steps, unit="steps", enabled=parallel.main)
    for step in loader.batch_sampler.steps():
        optimizer.zero_grad(set_to_none=True)
        for index, micro in enumerate(step):
            inputs, targets = next(batches)
            inputs, targets = inputs.to(device), objective.to_device(targets, device)
            torch.manual_seed(micro.seed)  # dropout draws the same wherever the micro-batch is computed
            with _norm_momenta(model, index, len(step)):
                outputs, loss = _backward(model, inputs, targets, loss_fn, weight=micro.weight,
                                          sparsifier=sparsifier, precision=precision, parallel=parallel,
                                          last=index == len(step) - 1)
            totals[0] += float(loss.detach().float()) * micro.size
            totals[2] += micro.size
            if classifying:
                totals[1] += int((outputs.detach().argmax(1) == targets).sum())
        _optimizer_step(optimizer, scheduler, sparsifier, precision)
        bar.update(1)
        bar.set_postfix(_running(totals, classifying, sparsifier))
    bar.close()
    if sparsifier is not None:
        sparsifier.after_epoch()
    loss_sum, correct, seen = parallel.total(totals)
    metrics = {"train_loss": loss_sum / max(seen, 1)}
    if classifying:
        metrics["train_accuracy"] = correct / max(seen, 1)
    if sparsifier is not None:
        metrics["ratio"] = sparsifier.ratio
    return metrics


def _backward(model: nn.Module, inputs, targets, loss_fn: LossFn, *, weight: float, sparsifier: Sparsifier | None,
              precision: MixedPrecision, parallel: DataParallel, last: bool):
    """One micro-batch's gradients, added to those of the step so far (the processes' gradients are averaged
    after the step's last backward pass only). Returns its outputs and (unweighted) loss."""
    budgets = sparsifier.step_budgets() if sparsifier is not None else [None]
    for index, budget in enumerate(budgets):  # one, except for nested fine-tuning: every budget's gradients
        if budget is not None:
            sparsifier.use_budget(budget)
        with precision.autocast():
            outputs = model(inputs)
            loss = loss_fn(outputs, targets, inputs)
        total = loss * weight
        if sparsifier is not None:  # a regulariser of the weights, added once per step over the processes
            total = total + sparsifier.regularizer() * weight
        with parallel.accumulating(model, more_to_come=not (last and index == len(budgets) - 1)):
            precision.backward(total / len(budgets))
    return outputs, loss


@contextlib.contextmanager
def _norm_momenta(model: nn.Module, index: int, count: int):
    """BatchNorm's running statistics move once per step by its momentum m towards the mean of the step's
    micro-batch statistics, however many micro-batches a process accumulates: micro-batch `index` of `count`
    updates with momentum (m/K) / (1 - (K-1-index) m/K), K = count, which gives each micro-batch the weight m/K and
    the old statistics 1 - m. The processes' statistics, averaged (DataParallel.average_norm_statistics), are then
    exactly those of one process computing all the step's micro-batches (the update is linear)."""
    norms = [m for m in running_norms(model) if m.momentum is not None] if count > 1 else []
    momenta = [norm.momentum for norm in norms]
    for norm, momentum in zip(norms, momenta):
        share = momentum / count
        norm.momentum = share / (1 - (count - 1 - index) * share)
    try:
        yield
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum


def _optimizer_step(optimizer: torch.optim.Optimizer, scheduler, sparsifier: Sparsifier | None,
                    precision: MixedPrecision) -> None:
    scale = precision.gradient_scale  # the one this step's gradients carry (the step may change it)
    stepped = precision.step(optimizer)
    with warnings.catch_warnings():  # a step the fp16 scaler skipped still counts, as for the mask schedule
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
        scheduler.step()
    if sparsifier is not None:
        sparsifier.step(gradient_scale=scale, skipped=not stepped)


def _running(totals: list[float], classifying: bool, sparsifier: Sparsifier | None) -> dict:
    """This process's running figures for the progress line."""
    loss_sum, correct, seen = totals
    postfix = {"loss": f"{loss_sum / max(seen, 1):.4f}"}
    if classifying:
        postfix["acc"] = f"{correct / max(seen, 1):.4f}"
    if sparsifier is not None:
        postfix["ratio"] = f"{sparsifier.ratio:.4f}"
    return postfix


@torch.no_grad()
def recalibrate_norms(model: nn.Module, loader: DataLoader, *, device: torch.device, batches: int = 20,
                      parallel: DataParallel | None = None) -> None:
    """BatchNorm running statistics measured afresh (a plain average over about `batches` micro-batches of the
    training data, weights untouched): what evaluation needs after the masks changed (a nested model's other
    budget). The micro-batches are those of the epoch's first steps, all of each step's, however the processes
    share them: each process averages its own, then the processes average theirs."""
    norms = running_norms(model)
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    model.eval()  # dropout and the rest as in evaluation: only the norms measure
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    if isinstance(loader.batch_sampler, StepSampler):
        layout = loader.batch_sampler.layout
        batches = math.ceil(batches / layout.parts) * layout.accumulation
    for index, (inputs, _) in enumerate(loader):
        if index == batches:
            break
        model(inputs.to(device))
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    if parallel is not None:
        parallel.average_norm_statistics(model)
    model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, objective: Objective, *, device: torch.device,
             desc: str = "eval", show: bool = True) -> float:
    """The task's test metric (torchmetrics) of the model on the loader: accuracy, mIoU, mAP or PSNR. In a
    data-parallel run each process scores its share of the test set (ShardSampler) and torchmetrics sums the
    processes' counts when the score is computed. `show`: a progress line (rank 0's only)."""
    model.eval()
    metric = objective.metric().to(device)
    for inputs, targets in Progress(loader, desc, enabled=show):
        objective.update(metric, model(inputs.to(device)), objective.to_device(targets, device))
    return objective.score(metric)


class TaskLoss:
    """The task's own loss (cross-entropy, L1, focal + box loss...)."""

    def __init__(self, objective: Objective):
        self.objective = objective

    def __call__(self, outputs, targets, inputs: torch.Tensor) -> torch.Tensor:
        return self.objective.loss(outputs, targets)


class DistillationLoss:
    """(1 - w) * task loss + w * distillation towards the teacher's outputs at temperature T (Hinton et al.;
    for classification T^2 * KL(teacher || student); see each Objective.distill)."""

    def __init__(self, teacher: nn.Module, *, temperature: float, weight: float, objective: Objective | None = None):
        self.teacher = teacher.eval()
        self.temperature = temperature
        self.weight = weight
        self.objective = objective or ClassificationObjective(classes=0)

    def __call__(self, outputs, targets, inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher = self.teacher(inputs)
        soft = self.objective.distill(outputs, teacher, self.temperature)
        return (1 - self.weight) * self.objective.loss(outputs, targets) + self.weight * soft
