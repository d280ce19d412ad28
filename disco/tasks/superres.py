"""Super-resolution: an EDSR-style network (residual conv blocks, PixelShuffle upsampler); L1 loss and
distillation, PSNR. Data: x2 pairs of Fashion-MNIST, scikit-image's photos or the user's images
(disco.data.superres)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from disco.tasks.objectives import Objective

if TYPE_CHECKING:  # torchmetrics takes a second and a half to import: only scoring needs it
    from torchmetrics import Metric


class ResidualBlock(nn.Module):
    def __init__(self, features: int, scale: float):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(features, features, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(features, features, 3, padding=1))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) * self.scale


class EDSR(nn.Module):
    """EDSR (Lim et al. 2017) without BatchNorm: head conv, residual blocks, upsampler (conv to
    features x scale^2 channels, PixelShuffle), tail conv. It predicts the difference to the bicubic
    upscaling of its input, which makes short training runs converge (the bicubic image is the start)."""

    disco_task = "superres"  # how node 0 reads the output of a deployment

    def __init__(self, in_channels: int = 3, features: int = 32, blocks: int = 4, scale: int = 2,
                 residual_scale: float = 0.1):
        super().__init__()
        self.scale = scale
        self.head = nn.Conv2d(in_channels, features, 3, padding=1)
        self.body = nn.Sequential(*(ResidualBlock(features, residual_scale) for _ in range(blocks)),
                                  nn.Conv2d(features, features, 3, padding=1))
        self.upsample = nn.Sequential(nn.Conv2d(features, features * scale * scale, 3, padding=1),
                                      nn.PixelShuffle(scale))
        # PixelShuffle turns each run of scale^2 channels into one channel: keep such runs on one node
        self.upsample[0].disco_channel_block = scale * scale
        self.tail = nn.Conv2d(features, in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.head(x)
        features = features + self.body(features)
        residual = self.tail(self.upsample(features))
        return F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False) + residual


def edsr(num_classes: int = 0, in_channels: int = 3, **kwargs) -> EDSR:
    """`disco:edsr` (num_classes is accepted and ignored: the output has the input's channels)."""
    return EDSR(in_channels=in_channels, **kwargs)


class SuperResObjective(Objective):
    metric_name = "psnr"

    def loss(self, outputs, targets) -> torch.Tensor:
        return F.l1_loss(outputs, targets)

    def distill(self, outputs, teacher, temperature: float) -> torch.Tensor:
        return F.l1_loss(outputs, teacher)

    def metric(self, sync_on_compute: bool = True) -> Metric:  # PSNR per image, then averaged
        from torchmetrics.image import PeakSignalNoiseRatio

        return PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3), sync_on_compute=sync_on_compute)

    def update(self, metric: Metric, outputs, targets) -> None:
        metric.update(outputs.clamp(0, 1), targets)


def describe(output: torch.Tensor, names: list[str] | None, *, detector=None, image_size=None) -> list[dict]:
    return [{"shape": list(image.shape), "text": f"upscaled image {'x'.join(map(str, image.shape))}"}
            for image in output]


def answer(output: torch.Tensor, names: list[str] | None, *, detector=None, image_size=None, top_k: int = 5) -> list[dict]:
    """`disco serve`'s answer per image: the upscaled image ("image": [C, H, W] in 0..1)."""
    return [{**found, "image": image.clamp(0, 1)} for found, image in zip(describe(output, names), output)]
