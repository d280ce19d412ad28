"""What "training" and "scoring" mean for each task: loss, distillation from the dense model, test metric.

The training pipeline (disco.training) is the same for every task; it asks the task's objective for the
loss of a batch, the distillation loss against the teacher's outputs, a fresh torchmetrics metric and the
DataLoader collate function. Metrics: top-1 accuracy, mIoU (MulticlassJaccardIndex), mAP
(MeanAveragePrecision, COCO's 0.5:0.95) and PSNR (dB, mean over images).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._pytree import tree_map
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex
from torchmetrics.detection import MeanAveragePrecision
from torchmetrics.image import PeakSignalNoiseRatio

from disco.data.scenes import collate_scenes, detection_targets
from disco.errors import DiscoError

IGNORE = 255  # VOC's "void" label in segmentation masks


def soft_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float, dim: int = 1) -> torch.Tensor:
    """T^2 * KL(teacher || student) of softened distributions over `dim` (Hinton et al.), mean per position."""
    log_student = F.log_softmax(student / temperature, dim)
    log_teacher = F.log_softmax(teacher / temperature, dim)
    positions = student.numel() // student.shape[dim]
    kl = F.kl_div(log_student, log_teacher, reduction="sum", log_target=True) / positions
    return kl * temperature * temperature


@dataclass
class Objective:
    """Base: classification. `classes` is the model's number of outputs; `model` the dense model (detection
    decodes boxes with its anchor generator and box coder, which have no weights)."""

    classes: int
    model: nn.Module | None = None
    image_size: tuple[int, int] = (0, 0)
    metric_name = "accuracy"
    collate = None  # DataLoader's default

    def to_device(self, targets, device: torch.device):
        return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, targets)

    def loss(self, outputs, targets) -> torch.Tensor:
        return F.cross_entropy(outputs, targets)

    def distill(self, outputs, teacher, temperature: float) -> torch.Tensor:
        return soft_kl(outputs, teacher, temperature)

    def metric(self, sync_on_compute: bool = True) -> Metric:
        """A fresh metric; sync_on_compute=False inside a torch.distributed job whose ranks do not all score."""
        return MulticlassAccuracy(num_classes=self.classes, average="micro", sync_on_compute=sync_on_compute)

    def update(self, metric: Metric, outputs, targets) -> None:
        metric.update(outputs, targets)

    def score(self, metric: Metric) -> float:
        return float(metric.compute())


class SegmentationObjective(Objective):
    metric_name = "miou"
    collate = staticmethod(collate_scenes)

    def loss(self, outputs, targets) -> torch.Tensor:
        return F.cross_entropy(outputs, targets["mask"], ignore_index=IGNORE)

    def metric(self, sync_on_compute: bool = True) -> Metric:
        return MulticlassJaccardIndex(num_classes=self.classes, average="macro", ignore_index=IGNORE,
                                      sync_on_compute=sync_on_compute)

    def update(self, metric: Metric, outputs, targets) -> None:
        metric.update(outputs.argmax(1), targets["mask"])


class SuperResObjective(Objective):
    metric_name = "psnr"

    def loss(self, outputs, targets) -> torch.Tensor:
        return F.l1_loss(outputs, targets)

    def distill(self, outputs, teacher, temperature: float) -> torch.Tensor:
        return F.l1_loss(outputs, teacher)

    def metric(self, sync_on_compute: bool = True) -> Metric:  # PSNR per image, then averaged
        return PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3), sync_on_compute=sync_on_compute)

    def update(self, metric: Metric, outputs, targets) -> None:
        metric.update(outputs.clamp(0, 1), targets)


class DetectionObjective(Objective):
    metric_name = "map"
    collate = staticmethod(collate_scenes)

    def loss(self, outputs, targets) -> torch.Tensor:
        return self.model.loss(tuple(outputs), detection_targets(targets), self.image_size)

    def distill(self, outputs, teacher, temperature: float) -> torch.Tensor:
        """Match the teacher's head maps: class logits as softened sigmoids, box offsets by L1."""
        levels = len(outputs) // 2
        scores = sum(F.binary_cross_entropy_with_logits(s / temperature, torch.sigmoid(t / temperature))
                     for s, t in zip(outputs[:levels], teacher[:levels])) / levels
        boxes = sum(F.l1_loss(s, t) for s, t in zip(outputs[levels:], teacher[levels:])) / levels
        return scores * temperature * temperature + boxes

    def metric(self, sync_on_compute: bool = True) -> Metric:
        return MeanAveragePrecision(box_format="xyxy", iou_type="bbox", sync_on_compute=sync_on_compute)

    def update(self, metric: Metric, outputs, targets) -> None:
        detections = self.model.detect(tuple(outputs), self.image_size)
        metric.update([{k: d[k] for k in ("boxes", "scores", "labels")} for d in detections],
                      detection_targets(targets))

    def score(self, metric: Metric) -> float:
        return float(metric.compute()["map"])


OBJECTIVES = {"classification": Objective, "segmentation": SegmentationObjective, "detection": DetectionObjective,
              "superres": SuperResObjective}


def objective_for(task: str, *, classes: int, model: nn.Module, image_size: tuple[int, int]) -> Objective:
    if task not in OBJECTIVES:
        raise DiscoError(f"unknown task {task!r}; known: {', '.join(OBJECTIVES)}")
    if task == "detection" and not hasattr(model, "detect"):
        raise DiscoError("--task detection needs a detector that returns head maps, such as "
                         "disco:retinanet_resnet18")
    return OBJECTIVES[task](classes=classes, model=model, image_size=tuple(image_size))
