"""One epoch of training and one evaluation pass, with progress bars (tqdm) on a terminal."""
from __future__ import annotations

import sys
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy
from tqdm import tqdm

from disco.sparsify import Sparsifier

# loss_fn(outputs, targets, inputs) -> loss (inputs let a distillation loss query its teacher)
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _bar(loader: DataLoader, desc: str):
    return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not sys.stderr.isatty())


def train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler, loss_fn: LossFn, *, device: torch.device,
                desc: str, sparsifier: Sparsifier | None = None) -> dict:
    """Returns mean training loss and accuracy of the epoch (and the communication ratio reached)."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    bar = _bar(loader, desc)
    for inputs, targets in bar:
        inputs, targets = inputs.to(device), targets.to(device)
        outputs = model(inputs)
        loss = loss_fn(outputs, targets, inputs)
        if sparsifier is not None:
            loss = loss + sparsifier.regularizer()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if sparsifier is not None:
            sparsifier.step()
        total_loss += float(loss.detach()) * len(targets)
        correct += int((outputs.detach().argmax(1) == targets).sum())
        seen += len(targets)
        postfix = {"loss": f"{total_loss / seen:.4f}", "acc": f"{correct / seen:.4f}"}
        if sparsifier is not None:
            postfix["ratio"] = f"{sparsifier.ratio:.4f}"
        bar.set_postfix(postfix)
    metrics = {"train_loss": total_loss / max(seen, 1), "train_accuracy": correct / max(seen, 1)}
    if sparsifier is not None:
        metrics["ratio"] = sparsifier.ratio
    return metrics


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, classes: int, *, device: torch.device,
             desc: str = "eval") -> float:
    """Top-1 accuracy (torchmetrics) of the model on the loader."""
    model.eval()
    accuracy = MulticlassAccuracy(num_classes=classes, average="micro").to(device)
    for inputs, targets in _bar(loader, desc):
        accuracy.update(model(inputs.to(device)), targets.to(device))
    return float(accuracy.compute())


class DistillationLoss:
    """(1 - w) * cross-entropy + w * T^2 * KL(teacher || student) at temperature T (Hinton et al.)."""

    def __init__(self, teacher: nn.Module, *, temperature: float, weight: float):
        self.teacher = teacher.eval()
        self.temperature = temperature
        self.weight = weight

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher = self.teacher(inputs)
        t = self.temperature
        soft = nn.functional.kl_div(nn.functional.log_softmax(outputs / t, 1), nn.functional.log_softmax(teacher / t, 1),
                                    reduction="batchmean", log_target=True) * t * t
        return (1 - self.weight) * nn.functional.cross_entropy(outputs, targets) + self.weight * soft


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs, targets)
