"""One epoch of training and one evaluation pass, with progress on a terminal and in logs (disco/progress.py).

Both work for every task: the task's Objective (disco.tasks.objectives; each task module defines its own)
gives the loss, the distillation term and the test metric.
"""
from __future__ import annotations

import re
import warnings
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from disco.progress import Progress
from disco.sparsify import Sparsifier
from disco.training.precision import MixedPrecision
from disco.tasks.classification import ClassificationObjective
from disco.tasks.objectives import Objective

# loss_fn(outputs, targets, inputs) -> loss (inputs let a distillation loss query its teacher)
LossFn = Callable[[object, object, torch.Tensor], torch.Tensor]


def _bar(loader: DataLoader, desc: str):
    return Progress(loader, desc)


def train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler, loss_fn: LossFn, *, device: torch.device,
                desc: str, objective: Objective, sparsifier: Sparsifier | None = None,
                precision: MixedPrecision | None = None) -> dict:
    """Returns the epoch's mean training loss (and accuracy, for classification; and the ratio reached).
    `precision`: autocast and loss scaling (disco/training/precision.py; default fp32)."""
    precision = precision or MixedPrecision("fp32", device)
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    classifying = objective.metric_name == "accuracy"
    bar = _bar(loader, desc)
    for inputs, targets in bar:
        inputs, targets = inputs.to(device), objective.to_device(targets, device)
        optimizer.zero_grad(set_to_none=True)
        budgets = sparsifier.step_budgets() if sparsifier is not None else [None]
        for budget in budgets:  # one, except for nested fine-tuning: every budget's gradients, then one step
            if budget is not None:
                sparsifier.use_budget(budget)
            with precision.autocast():
                outputs = model(inputs)
                loss = loss_fn(outputs, targets, inputs)
            if sparsifier is not None:
                loss = loss + sparsifier.regularizer()
            precision.backward(loss / len(budgets))
        scale = precision.gradient_scale  # the one this step's gradients carry (the step may change it)
        stepped = precision.step(optimizer)
        with warnings.catch_warnings():  # a step the fp16 scaler skipped still counts, as for the mask schedule
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            scheduler.step()
        if sparsifier is not None:
            sparsifier.step(gradient_scale=scale, skipped=not stepped)
        total_loss += float(loss.detach().float()) * len(inputs)
        seen += len(inputs)
        postfix = {"loss": f"{total_loss / seen:.4f}"}
        if classifying:
            correct += int((outputs.detach().argmax(1) == targets).sum())
            postfix["acc"] = f"{correct / seen:.4f}"
        if sparsifier is not None:
            postfix["ratio"] = f"{sparsifier.ratio:.4f}"
        bar.set_postfix(postfix)
    if sparsifier is not None:
        sparsifier.after_epoch()
    metrics = {"train_loss": total_loss / max(seen, 1)}
    if classifying:
        metrics["train_accuracy"] = correct / max(seen, 1)
    if sparsifier is not None:
        metrics["ratio"] = sparsifier.ratio
    return metrics


@torch.no_grad()
def recalibrate_norms(model: nn.Module, loader: DataLoader, *, device: torch.device, batches: int = 20) -> None:
    """BatchNorm running statistics measured afresh (a plain average over `batches` training batches, weights
    untouched): what evaluation needs after the masks changed (a nested model's other budget)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    model.eval()  # dropout and the rest as in evaluation: only the norms measure
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    for index, (inputs, _) in enumerate(loader):
        if index == batches:
            break
        model(inputs.to(device))
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, objective: Objective, *, device: torch.device,
             desc: str = "eval") -> float:
    """The task's test metric (torchmetrics) of the model on the loader: accuracy, mIoU, mAP or PSNR."""
    model.eval()
    metric = objective.metric().to(device)
    for inputs, targets in _bar(loader, desc):
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
