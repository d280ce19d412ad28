"""What "training" and "scoring" mean for a task: loss, distillation from the dense model, test metric.

The training pipeline (disco.training) is the same for every task; it asks the task's objective (an
Objective subclass, defined in the task's module and registered with it) for the loss of a batch, the
distillation loss against the teacher's outputs, a fresh torchmetrics metric and the DataLoader collate
function. Metrics: top-1 accuracy, mIoU, mAP (COCO's 0.5:0.95) and PSNR (dB, mean over images).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._pytree import tree_map

if TYPE_CHECKING:  # torchmetrics takes a second and a half to import: only scoring needs it
    from torchmetrics import Metric


def soft_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float, dim: int = 1) -> torch.Tensor:
    """T^2 * KL(teacher || student) of softened distributions over `dim` (Hinton et al.), mean per position."""
    log_student = F.log_softmax(student / temperature, dim)
    log_teacher = F.log_softmax(teacher / temperature, dim)
    positions = student.numel() // student.shape[dim]
    kl = F.kl_div(log_student, log_teacher, reduction="sum", log_target=True) / positions
    return kl * temperature * temperature


@dataclass
class Objective:
    """Base of every task's objective. `classes` is the model's number of outputs; `model` the dense model
    (detection decodes boxes with its anchor generator and box coder, which have no weights). A subclass sets
    metric_name and defines loss and metric; the defaults below fit models that output class logits."""

    classes: int
    model: nn.Module | None = None
    image_size: tuple[int, int] = (0, 0)
    metric_name = ""
    collate = None  # DataLoader's default

    def __post_init__(self) -> None:
        """Subclasses check here that they can work with `model` (calling this first)."""
        self.image_size = tuple(self.image_size)

    def to_device(self, targets, device: torch.device):
        return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, targets)

    def loss(self, outputs, targets) -> torch.Tensor:
        raise NotImplementedError

    def distill(self, outputs, teacher, temperature: float) -> torch.Tensor:
        return soft_kl(outputs, teacher, temperature)

    def metric(self, sync_on_compute: bool = True) -> Metric:
        """A fresh metric; sync_on_compute=False inside a torch.distributed job whose ranks do not all score."""
        raise NotImplementedError

    def update(self, metric: Metric, outputs, targets) -> None:
        metric.update(outputs, targets)

    def score(self, metric: Metric) -> float:
        return float(metric.compute())
