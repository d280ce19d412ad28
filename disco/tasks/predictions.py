"""What node 0 prints for each output of a distributed run, per task (a short line per input)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from disco.errors import DiscoError

TASKS = ("classification", "segmentation", "detection", "superres")
DETECTIONS_SHOWN = 5


def _label(names: list[str] | None, index: int) -> str:
    return names[index] if names and index < len(names) else str(index)


def _classification(output: torch.Tensor, names) -> list[dict]:
    best = output.float().softmax(-1).max(-1)
    return [{"class": int(c), "label": _label(names, int(c)), "probability": float(p),
             "text": f"{_label(names, int(c))} ({float(p):.1%})"} for c, p in zip(best.indices, best.values)]


def _segmentation(output: torch.Tensor, names) -> list[dict]:
    found = []
    for mask in output.argmax(1):
        classes, counts = mask.unique(return_counts=True)
        pixels = {_label(names, int(c)): int(n) for c, n in zip(classes, counts)}
        found.append({"pixels_per_class": pixels,
                      "text": ", ".join(f"{k} {v} px" for k, v in sorted(pixels.items(), key=lambda kv: -kv[1]))})
    return found


def _superres(output: torch.Tensor, names) -> list[dict]:
    return [{"shape": list(image.shape), "text": f"upscaled image {'x'.join(map(str, image.shape))}"}
            for image in output]


def _detection(output: tuple, names, detector: nn.Module, image_size) -> list[dict]:
    found = []
    for result in detector.detect(tuple(output), tuple(image_size)):
        boxes = [{"label": _label(names, int(l)), "score": float(s), "box": [round(float(v), 1) for v in b]}
                 for b, s, l in zip(result["boxes"], result["scores"], result["labels"])]
        shown = "; ".join(f"{d['label']} {d['score']:.2f} at {d['box']}" for d in boxes[:DETECTIONS_SHOWN])
        found.append({"detections": boxes, "text": f"{len(boxes)} objects: {shown}" if boxes else "no objects"})
    return found


def describe(task: str, output, names: list[str] | None, *, detector: nn.Module | None = None,
             image_size=None) -> list[dict]:
    """One dict per image with a `text` line; the detection task decodes boxes with `detector`."""
    if task == "classification":
        return _classification(output, names)
    if task == "segmentation":
        return _segmentation(output, names)
    if task == "superres":
        return _superres(output, names)
    if task == "detection":
        return _detection(tree_leaves(output), names, detector, image_size)
    raise DiscoError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
