"""Semantic segmentation: an FCN on a ResNet-18 trunk, small enough to train on a CPU."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models import resnet18
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.fcn import FCNHead


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
