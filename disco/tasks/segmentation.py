"""Semantic segmentation: an FCN on a ResNet-18 trunk, small enough to train on a CPU; per-pixel
cross-entropy, mIoU (MulticlassJaccardIndex). Data: Fashion-MNIST scenes or the user's VOC folder."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models import resnet18
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.fcn import FCNHead

from disco.data.annotated import VOC_IGNORE
from disco.data.scenes import collate_scenes
from disco.tasks.objectives import Objective
from disco.tasks.registry import class_label

if TYPE_CHECKING:  # torchmetrics takes a second and a half to import: only scoring needs it
    from torchmetrics import Metric


class FCN(nn.Module):
    """torchvision's FCN recipe (trunk features -> FCNHead -> bilinear upsampling to the input size), but
    returning the logits tensor rather than a dict, so the split model has one plain output."""

    disco_task = "segmentation"  # how node 0 reads the output of a deployment

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.classifier = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)["out"]
        return F.interpolate(self.classifier(features), size=x.shape[-2:], mode="bilinear", align_corners=False)


def fcn_resnet18(num_classes: int = 21, in_channels: int = 3, stem_stride: int = 1) -> FCN:
    """ResNet-18 up to layer3 (256 channels). With a stride-1 stem the features are 1/8 of the input
    (12x12 for 96x96 scenes), fine enough for 28-pixel objects."""
    trunk = resnet18()
    trunk.conv1 = nn.Conv2d(in_channels, 64, 7, stride=stem_stride, padding=3, bias=False)
    backbone = IntermediateLayerGetter(trunk, return_layers={"layer3": "out"})
    return FCN(backbone, FCNHead(256, num_classes))


class SegmentationObjective(Objective):
    """Pixels labelled VOC_IGNORE (VOC's "void" object borders) count in neither loss nor metric."""

    metric_name = "miou"
    collate = staticmethod(collate_scenes)

    def loss(self, outputs, targets) -> torch.Tensor:
        return F.cross_entropy(outputs, targets["mask"], ignore_index=VOC_IGNORE)

    def metric(self, sync_on_compute: bool = True) -> Metric:
        from torchmetrics.classification import MulticlassJaccardIndex

        return MulticlassJaccardIndex(num_classes=self.classes, average="macro", ignore_index=VOC_IGNORE,
                                      sync_on_compute=sync_on_compute)

    def update(self, metric: Metric, outputs, targets) -> None:
        metric.update(outputs.argmax(1), targets["mask"])


def describe(output: torch.Tensor, names: list[str] | None, *, detector=None, image_size=None) -> list[dict]:
    """Pixels per predicted class, most frequent first."""
    found = []
    for mask in output.argmax(1):
        classes, counts = mask.unique(return_counts=True)
        pixels = {class_label(names, int(c)): int(n) for c, n in zip(classes, counts)}
        found.append({"pixels_per_class": pixels,
                      "text": ", ".join(f"{k} {v} px" for k, v in sorted(pixels.items(), key=lambda kv: -kv[1]))})
    return found


def answer(output: torch.Tensor, names: list[str] | None, *, detector=None, image_size=None, top_k: int = 5) -> list[dict]:
    """`disco serve`'s answer per image: pixels per class, and the class mask ("mask": [H, W] class indices)."""
    return [{**found, "mask": mask} for found, mask in zip(describe(output, names), output.argmax(1))]
