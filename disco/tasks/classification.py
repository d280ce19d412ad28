"""Image classification: cross-entropy, top-1 accuracy, and the small ViT that trains on a CPU.

Data: Fashion-MNIST (offline from Debian's package) or the user's ImageFolder (disco.data.datasets).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from disco.data.datasets import DataRequest, DataSpec, fashion_mnist, image_folder
from disco.tasks.objectives import Objective
from disco.tasks.registry import class_label

if TYPE_CHECKING:  # torchmetrics takes a second and a half to import: only scoring needs it
    from torchmetrics import Metric


class ClassificationObjective(Objective):
    metric_name = "accuracy"

    def loss(self, outputs, targets) -> torch.Tensor:
        return F.cross_entropy(outputs, targets)

    def metric(self, sync_on_compute: bool = True) -> Metric:
        from torchmetrics.classification import MulticlassAccuracy

        return MulticlassAccuracy(num_classes=self.classes, average="micro", sync_on_compute=sync_on_compute)


def describe(output: torch.Tensor, names: list[str] | None, *, detector=None, image_size=None) -> list[dict]:
    best = output.float().softmax(-1).max(-1)
    return [{"class": int(c), "label": class_label(names, int(c)), "probability": float(p),
             "text": f"{class_label(names, int(c))} ({float(p):.1%})"} for c, p in zip(best.indices, best.values)]


def answer(output: torch.Tensor, names: list[str] | None, *, detector=None, image_size=None,
           top_k: int = 5) -> list[dict]:
    """`disco serve`'s answer per image: the top_k classes with their probabilities, most probable first."""
    probabilities = output.float().softmax(-1)
    best = probabilities.topk(min(top_k, probabilities.shape[-1]), dim=-1)
    return [{"top": [{"class": int(c), "label": class_label(names, int(c)), "probability": float(p)}
                     for c, p in zip(indices, values)],
             "text": f"{class_label(names, int(indices[0]))} ({float(values[0]):.1%})"}
            for indices, values in zip(best.indices, best.values)]


def vit_small(**kwargs) -> nn.Module:
    """`disco:vit_small`, a ViT that trains on CPU: 28x28 images, 4x4 patches, 6 layers, 8 heads, width 256,
    MLP 512 (a small configuration of torchvision's VisionTransformer, which has no torchvision name)."""
    settings = dict(image_size=28, patch_size=4, num_layers=6, num_heads=8, hidden_dim=256, mlp_dim=512)
    return torchvision.models.VisionTransformer(**{**settings, **kwargs})


def fashion_mnist_data(request: DataRequest) -> DataSpec:
    return fashion_mnist(request.cache)


def image_folder_data(path: Path, request: DataRequest) -> DataSpec:
    """image_size: the side every image is resized to (default: the first training image's size)."""
    return image_folder(path, request.image_size, skip_bad_data=request.skip_bad_data, recipe=request.recipe)

