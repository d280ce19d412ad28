"""Fashion-MNIST scenes: a few real Fashion-MNIST items pasted on a black canvas, for segmentation and detection.

Each scene has a per-pixel class mask and one tight box + label per item, so the same data serves both tasks.
Label 0 is the background and item classes are shifted by one (1..10): 11 segmentation classes, and
torchvision detectors take num_classes=11.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from disco.data.datasets import (FASHION_MNIST_MEAN, FASHION_MNIST_STD, DataRequest, DataSpec,
                                 fashion_mnist_splits)
from disco.data.scene_options import ITEM_SIZE, SceneOptions
from disco.errors import DiscoError

FOREGROUND_THRESHOLD = 25  # an item's pixel (0..255) above this belongs to the item's mask and box
PLACEMENT_TRIES = 50  # random positions tried per item before giving up on it (the canvas may be full)
DEFAULT_TRAIN_SCENES, DEFAULT_TEST_SCENES = 10_000, 2_000


class FashionScenes(Dataset):
    """Scene i -> (image [1, canvas, canvas] normalised like Fashion-MNIST, target dict).

    target: "mask" LongTensor [canvas, canvas] (0 background, class + 1 on the item's pixels above
    FOREGROUND_THRESHOLD), "boxes" FloatTensor [k, 4] (x1, y1, x2, y2 in pixels, x2/y2 exclusive: the tight
    box of the item's mask), "labels" LongTensor [k] (class + 1). Items' 28x28 squares never overlap, so each
    item is pasted unchanged. Scene i depends only on (options.seed, i): any worker, any order, same scene.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, length: int, options: SceneOptions | None = None):
        if images.dtype != torch.uint8 or images.shape[1:] != (ITEM_SIZE, ITEM_SIZE) or len(images) != len(labels):
            raise DiscoError(f"FashionScenes expects uint8 images [N, {ITEM_SIZE}, {ITEM_SIZE}] and N labels, got "
                             f"{images.dtype} {tuple(images.shape)} and {len(labels)} labels")
        if length < 0:
            raise DiscoError(f"FashionScenes length must be >= 0, got {length}")
        self.images, self.labels, self.length = images, labels.long(), length
        self.options = options or SceneOptions()
        # Only items with some foreground can have a box: drawing from these keeps every box non-empty.
        self.usable = torch.nonzero((images > FOREGROUND_THRESHOLD).flatten(1).any(1)).flatten()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not 0 <= index < self.length:
            raise IndexError(f"scene {index} out of range [0, {self.length})")
        # numpy's SeedSequence mixes both numbers fully (torch's CPU generator keeps only 32 bits of a seed).
        generator = np.random.default_rng([self.options.seed, index])
        canvas = torch.zeros(self.options.canvas, self.options.canvas, dtype=torch.uint8)
        mask = torch.zeros(self.options.canvas, self.options.canvas, dtype=torch.long)
        boxes, labels = [], []
        for item, (top, left) in self._placements(generator):
            label = int(self.labels[item]) + 1
            canvas[top:top + ITEM_SIZE, left:left + ITEM_SIZE] = self.images[item]
            mask[top:top + ITEM_SIZE, left:left + ITEM_SIZE][self.images[item] > FOREGROUND_THRESHOLD] = label
            boxes.append(item_box(self.images[item], top, left))
            labels.append(label)
        image = (canvas.float().unsqueeze(0) / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
        return image, {"mask": mask, "boxes": torch.stack(boxes), "labels": torch.tensor(labels, dtype=torch.long)}

    def _placements(self, generator: np.random.Generator) -> list[tuple[int, tuple[int, int]]]:
        """(item index, (top, left)) for each placed item; an item with no free spot in PLACEMENT_TRIES is dropped."""
        options = self.options
        count = int(generator.integers(options.min_items, options.max_items + 1))
        items = self.usable[torch.from_numpy(generator.integers(len(self.usable), size=count))].tolist()
        placed: list[tuple[int, tuple[int, int]]] = []
        for item in items:
            spot = free_spot([spot for _, spot in placed], options.canvas, generator)
            if spot is not None:
                placed.append((item, spot))
        return placed


def free_spot(taken: list[tuple[int, int]], canvas: int, generator: np.random.Generator) -> tuple[int, int] | None:
    """A random (top, left) whose item square overlaps none of the `taken` ones, or None after PLACEMENT_TRIES."""
    for _ in range(PLACEMENT_TRIES):
        top, left = generator.integers(canvas - ITEM_SIZE + 1, size=2).tolist()
        if all(abs(top - other_top) >= ITEM_SIZE or abs(left - other_left) >= ITEM_SIZE
               for other_top, other_left in taken):
            return top, left
    return None


def item_box(item: torch.Tensor, top: int, left: int) -> torch.Tensor:
    """Tight xyxy box (x2/y2 exclusive) of the item's foreground pixels, in canvas coordinates."""
    rows = torch.nonzero((item > FOREGROUND_THRESHOLD).any(1)).flatten().tolist()
    cols = torch.nonzero((item > FOREGROUND_THRESHOLD).any(0)).flatten().tolist()
    return torch.tensor([left + cols[0], top + rows[0], left + cols[-1] + 1, top + rows[-1] + 1], dtype=torch.float)


def fashion_scenes(*, cache: Path | None = None, train_length: int | None = None, test_length: int | None = None,
                   options: SceneOptions | None = None) -> tuple[FashionScenes, FashionScenes, list[str]]:
    """(train scenes from the train split, test scenes from the test split, Fashion-MNIST class names).

    Test scenes use seed 2 * options.seed + 1 and train scenes 2 * options.seed, so no seed makes a test
    layout repeat a train layout.
    """
    options = options or SceneOptions()
    train, test = fashion_mnist_splits(cache)
    train_options, test_options = replace(options, seed=2 * options.seed), replace(options, seed=2 * options.seed + 1)
    lengths = (DEFAULT_TRAIN_SCENES if train_length is None else train_length,
               DEFAULT_TEST_SCENES if test_length is None else test_length)
    return (FashionScenes(train.data, train.targets, lengths[0], train_options),
            FashionScenes(test.data, test.targets, lengths[1], test_options), list(train.classes))


def scenes_data(request: DataRequest) -> DataSpec:
    """Built-in "fashion-scenes" of segmentation and detection: 1 channel, 11 classes (0 = background).
    train_size/test_size are the numbers of scenes drawn (default 10000 / 2000); image_size the canvas side
    (default 96)."""
    options = SceneOptions(seed=request.seed)
    if request.image_size is not None:
        options = replace(options, canvas=request.image_size)
    train, test, names = fashion_scenes(cache=request.cache, train_length=request.train_size,
                                        test_length=request.test_size, options=options)
    canvas = train.options.canvas
    return DataSpec("fashion-scenes", train, test, channels=1, classes=len(names) + 1, image_size=(canvas, canvas),
                    class_names=["background", *names], mean=[FASHION_MNIST_MEAN], std=[FASHION_MNIST_STD])


def collate_scenes(batch: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> tuple[torch.Tensor, dict]:
    """Stack images and masks; every other target (boxes, labels: their length varies) stays a per-image list.

    Works for any target dict of this package: scenes, VOC segmentation or COCO detection folders.
    """
    images = torch.stack([image for image, _ in batch])
    targets = {key: [target[key] for _, target in batch] for key in batch[0][1]}
    if "mask" in targets:
        targets["mask"] = torch.stack(targets["mask"])
    return images, targets


def detection_targets(targets: dict) -> list[dict[str, torch.Tensor]]:
    """A collated batch's targets as torchvision detectors want them: one {"boxes", "labels"} dict per image."""
    return [{"boxes": boxes, "labels": labels} for boxes, labels in zip(targets["boxes"], targets["labels"])]
