"""Object detection: RetinaNet on a small ResNet-18 + FPN, split up to its head convolutions.

What runs split across nodes is every convolution: trunk, FPN and the two head towers. `DenseRetinaNet`
therefore returns the raw per-level head maps; anchors, box decoding and NMS (torchvision's own RetinaNet
code) run on node 0 from those maps, as does the training loss.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._pytree import tree_leaves
from torchvision.models import resnet18
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.image_list import ImageList
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from disco.data.scenes import collate_scenes, detection_targets
from disco.errors import DiscoError
from disco.tasks.objectives import Objective
from disco.tasks.registry import class_label

if TYPE_CHECKING:  # torchmetrics takes a second and a half to import: only scoring needs it
    from torchmetrics import Metric

# Anchors for objects of 12 to 200 pixels on 96x96 scenes: three scales per level, three aspect ratios.
ANCHOR_BASES = (16, 32, 64, 128, 256)
DETECTIONS_SHOWN = 5  # per image, in node 0's printed line (all of them are in the run's summary)


class DenseRetinaNet(nn.Module):
    """A torchvision RetinaNet whose forward stops at the head maps (the part DISCO splits)."""

    disco_task = "detection"  # how node 0 reads the output of a deployment

    def __init__(self, detector: RetinaNet):
        super().__init__()
        self.detector = detector

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = list(self.detector.backbone(x).values())
        classification, regression = self.detector.head.classification_head, self.detector.head.regression_head
        scores = tuple(classification.cls_logits(classification.conv(f)) for f in features)
        boxes = tuple(regression.bbox_reg(regression.conv(f)) for f in features)
        return scores + boxes

    # --- node 0: from head maps to losses and detections -----------------------------------------------
    def head_outputs(self, maps: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        """Per-level maps -> torchvision's [N, anchors, K] / [N, anchors, 4] layout (as RetinaNetHead does)."""
        levels = len(maps) // 2
        classes = self.detector.head.classification_head.num_classes
        return {"cls_logits": torch.cat([_per_anchor(m, classes) for m in maps[:levels]], dim=1),
                "bbox_regression": torch.cat([_per_anchor(m, 4) for m in maps[levels:]], dim=1)}

    def anchors(self, maps: tuple[torch.Tensor, ...], image_size: tuple[int, int]) -> list[torch.Tensor]:
        batch = maps[0].shape[0]
        images = ImageList(maps[0].new_zeros(batch, 1, *image_size), [tuple(image_size)] * batch)
        return self.detector.anchor_generator(images, list(maps[:len(maps) // 2]))

    def loss(self, maps, targets: list[dict], image_size: tuple[int, int]) -> torch.Tensor:
        losses = self.detector.compute_loss(targets, self.head_outputs(maps), self.anchors(maps, image_size))
        return losses["classification"] + losses["bbox_regression"]

    def detect(self, maps, image_size: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
        """Boxes (xyxy pixels), scores and labels per image: decoding, score threshold and NMS."""
        outputs = self.head_outputs(maps)
        per_level = [m.shape[-2] * m.shape[-1] * self.detector.anchor_generator.num_anchors_per_location()[0]
                     for m in maps[:len(maps) // 2]]
        split = {k: list(v.split(per_level, dim=1)) for k, v in outputs.items()}
        anchors = [list(a.split(per_level)) for a in self.anchors(maps, image_size)]
        return self.detector.postprocess_detections(split, anchors, [tuple(image_size)] * maps[0].shape[0])


def _per_anchor(level: torch.Tensor, values: int) -> torch.Tensor:
    """[N, A*values, H, W] -> [N, H*W*A, values]."""
    batch, _, height, width = level.shape
    level = level.view(batch, -1, values, height, width).permute(0, 3, 4, 1, 2)
    return level.reshape(batch, -1, values)


def retinanet_resnet18(num_classes: int = 91, in_channels: int = 3, fpn_channels: int = 64) -> DenseRetinaNet:
    """ResNet-18 (layers 2-4) + FPN with P6/P7, `fpn_channels` wide; num_classes counts the background."""
    trunk = resnet18()
    trunk.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    backbone = BackboneWithFPN(trunk, return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
                               in_channels_list=[128, 256, 512], out_channels=fpn_channels,
                               extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels))
    sizes = tuple((b, round(b * 2 ** (1 / 3)), round(b * 2 ** (2 / 3))) for b in ANCHOR_BASES)
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    # 100 detections per image at most: COCO's mAP counts no more (a few objects per scene here)
    return DenseRetinaNet(RetinaNet(backbone, num_classes, anchor_generator=anchors, min_size=96, max_size=96,
                                    image_mean=[0.0] * in_channels, image_std=[1.0] * in_channels,
                                    detections_per_img=100))


class DetectionObjective(Objective):
    """RetinaNet's focal + box loss and mAP, both computed from the head maps by the dense model's decoder."""

    metric_name = "map"
    collate = staticmethod(collate_scenes)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not hasattr(self.model, "detect"):
            raise DiscoError("--task detection needs a detector that returns head maps, such as "
                             "disco:retinanet_resnet18")

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
        from torchmetrics.detection import MeanAveragePrecision

        return MeanAveragePrecision(box_format="xyxy", iou_type="bbox", sync_on_compute=sync_on_compute)

    def update(self, metric: Metric, outputs, targets) -> None:
        detections = self.model.detect(tuple(outputs), self.image_size)
        metric.update([{k: d[k] for k in ("boxes", "scores", "labels")} for d in detections],
                      detection_targets(targets))

    def score(self, metric: Metric) -> float:
        return float(metric.compute()["map"])


def describe(output, names: list[str] | None, *, detector: DenseRetinaNet | None = None,
             image_size=None) -> list[dict]:
    """Boxes decoded by `detector` (the dense model's decoder) from the head maps of `output`."""
    found = []
    for result in detector.detect(tuple(tree_leaves(output)), tuple(image_size)):
        boxes = [{"label": class_label(names, int(l)), "score": float(s), "box": [round(float(v), 1) for v in b]}
                 for b, s, l in zip(result["boxes"], result["scores"], result["labels"])]
        shown = "; ".join(f"{d['label']} {d['score']:.2f} at {d['box']}" for d in boxes[:DETECTIONS_SHOWN])
        found.append({"detections": boxes, "text": f"{len(boxes)} objects: {shown}" if boxes else "no objects"})
    return found


def answer(output, names: list[str] | None, *, detector: DenseRetinaNet | None = None, image_size=None,
           top_k: int = 5) -> list[dict]:
    """`disco serve`'s answer per image: every box (x1, y1, x2, y2 in the model's input pixels), label, score."""
    return describe(output, names, detector=detector, image_size=image_size)
