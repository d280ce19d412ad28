"""The user's own segmentation (Pascal VOC layout) and detection (COCO layout) folders.

Targets use the Fashion-scenes format (disco.data.scenes): segmentation {"mask": LongTensor [H, W]},
detection {"boxes": FloatTensor [k, 4] xyxy in pixels, "labels": LongTensor [k] in 1..K}; 0 is the
background. Every image is resized to the first training image's size (masks with nearest neighbour, boxes
scaled alike), so batches stack. Every image and mask is decoded before training (disco.data.checks): a sample
with a bad one is an error, or left out with --skip-bad-data.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from disco.data.checks import BadFile, ImageFile, check_samples, decode_image
from disco.data.datasets import DataRequest, DataSpec, image_channels, image_transform, rgb_image
from disco.errors import DiscoError

VOC_CLASS_NAMES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
                   "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
                   "train", "tvmonitor")
VOC_IGNORE = 255  # VOC marks object borders 255: kept as is, for a loss with ignore_index=255
NORMALISATION = 0.5  # mean and std per channel, as disco.data.datasets.image_folder uses for user images
MASK_MODES = ("P", "L")
MASK_RULE = "segmentation masks must be palette or greyscale PNGs whose pixel values are class indices"


@dataclass
class AnnotatedFolder:
    """What a user folder gives: train/val datasets and what the model must be adapted to."""
    train: Dataset
    test: Dataset
    channels: int
    classes: int  # including the background
    image_size: tuple[int, int]
    class_names: list[str]

    def spec(self, name: str) -> DataSpec:
        """As a DataSpec, normalised like disco.data.datasets.image_folder's user images."""
        return DataSpec(name, self.train, self.test, channels=self.channels, classes=self.classes,
                        image_size=self.image_size, class_names=self.class_names,
                        mean=[NORMALISATION] * self.channels, std=[NORMALISATION] * self.channels)


class _ResizedImages(Dataset):
    """Shared part: read image i as RGB, resize to `size`, normalise with `channels` channels."""

    def __init__(self, files: list[Path], channels: int, size: tuple[int, int]):
        self.files, self.size = files, size
        self.transform = image_transform(channels, None, [NORMALISATION] * channels, [NORMALISATION] * channels)

    def __len__(self) -> int:
        return len(self.files)

    def _image(self, index: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """(normalised image at self.size, the file's own (height, width))."""
        with Image.open(self.files[index]) as image:
            original = (image.height, image.width)
            resized = rgb_image(image).resize(self.size[::-1], Image.BILINEAR)
        return self.transform(resized), original


class VOCSegmentationFolder(_ResizedImages):
    """(image, {"mask": LongTensor [H, W]}) for each id of one VOC split; mask values are the PNG's indices."""

    def __init__(self, files: list[Path], masks: list[Path], channels: int, size: tuple[int, int]):
        super().__init__(files, channels, size)
        self.masks = masks

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image, _ = self._image(index)
        with read_index_mask(self.masks[index]) as mask:
            resized = mask.resize(self.size[::-1], Image.NEAREST)
        return image, {"mask": torch.from_numpy(np.asarray(resized, dtype=np.int64).copy())}


class COCODetectionFolder(_ResizedImages):
    """(image, {"boxes", "labels"}) per image of one COCO split; boxes scaled with the resize."""

    def __init__(self, files: list[Path], boxes: list[torch.Tensor], labels: list[torch.Tensor], channels: int,
                 size: tuple[int, int]):
        super().__init__(files, channels, size)
        self.boxes, self.labels = boxes, labels

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image, (height, width) = self._image(index)
        scale = torch.tensor([self.size[1] / width, self.size[0] / height] * 2)
        return image, {"boxes": self.boxes[index] * scale, "labels": self.labels[index]}


def read_index_mask(path: Path) -> Image.Image:
    """A class-index mask: a palette ("P", as VOC ships them) or greyscale PNG whose values are class ids."""
    image = Image.open(path)
    if image.mode not in MASK_MODES:
        image.close()
        raise DiscoError(f"{path} is a {image.mode} image: {MASK_RULE}")
    image.load()
    return image


def require(path: Path, what: str, layout: str) -> Path:
    if not path.exists():
        raise DiscoError(f"{path} not found: expected {what} ({layout})")
    return path


VOC_LAYOUT = "VOC layout: JPEGImages/<id>.jpg, SegmentationClass/<id>.png, ImageSets/Segmentation/{train,val}.txt"


def voc_split(root: Path, split: str) -> tuple[list[Path], list[Path]]:
    """(image files, mask files) of the ids listed in ImageSets/Segmentation/<split>.txt."""
    listing = require(root / "ImageSets" / "Segmentation" / f"{split}.txt", f"the {split} id list", VOC_LAYOUT)
    ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    if not ids:
        raise DiscoError(f"{listing} lists no image ids")
    images = [require(root / "JPEGImages" / f"{i}.jpg", "the image of every listed id", VOC_LAYOUT) for i in ids]
    masks = [require(root / "SegmentationClass" / f"{i}.png", "the mask of every listed id", VOC_LAYOUT)
             for i in ids]
    return images, masks


def voc_class_count(masks: list[Path]) -> int:
    """1 + the largest class index in any mask (the VOC_IGNORE border value does not count)."""
    largest = 0
    for path in masks:
        with read_index_mask(path) as mask:
            values = np.unique(np.asarray(mask))
        largest = max(largest, int(values[values != VOC_IGNORE].max(initial=0)))
    return largest + 1


def check_voc_sample(sample: tuple[Path, Path]) -> ImageFile:
    """Decode an (image, mask) pair; BadFile when either cannot be used: the mask must be a class-index PNG of
    its image's size (else it would not line up with the image once both are resized)."""
    image, mask = decode_image(sample[0]), decode_image(sample[1])
    if mask.mode not in MASK_MODES:
        raise BadFile(mask.path, f"is a {mask.mode} image: {MASK_RULE}")
    if mask.size != image.size:
        raise BadFile(mask.path, f"is {mask.size[1]}x{mask.size[0]} while its image {image.path.name} is "
                                 f"{image.size[1]}x{image.size[0]}: a mask must have its image's size")
    return image


def voc_segmentation(root: Path, skip_bad_data: bool = False) -> AnnotatedFolder:
    """A Pascal-VOC-style folder (train.txt -> train, val.txt -> test). Class count from the masks; VOC's class
    names when it has VOC's 21 classes, else background, class_1, class_2... skip_bad_data: leave out the
    samples whose image or mask cannot be used (else they are an error)."""
    root = require(Path(root), "a segmentation folder", VOC_LAYOUT)
    listed = {split: list(zip(*voc_split(root, split))) for split in ("train", "val")}
    checked = check_samples(listed, check_voc_sample, skip_bad=skip_bad_data, source=str(root))
    (train_images, train_masks), (val_images, val_masks) = (_unzip(checked[split].samples, 2)
                                                            for split in ("train", "val"))
    first = checked["train"].images[0]
    channels, size = image_channels(first), first.size
    classes = voc_class_count(train_masks + val_masks)
    names = list(VOC_CLASS_NAMES) if classes == len(VOC_CLASS_NAMES) else generic_class_names(classes)
    return AnnotatedFolder(VOCSegmentationFolder(train_images, train_masks, channels, size),
                           VOCSegmentationFolder(val_images, val_masks, channels, size), channels, classes, size,
                           names)


def _unzip(samples: list[tuple], fields: int) -> tuple[list, ...]:
    """[(a, b), ...] -> ([a, ...], [b, ...]); `fields` empty lists for no samples."""
    return tuple(list(column) for column in zip(*samples)) if samples else tuple([] for _ in range(fields))


def generic_class_names(classes: int) -> list[str]:
    return ["background", *(f"class_{i}" for i in range(1, classes))]


COCO_LAYOUT = "COCO layout: train/ and val/ image folders, annotations/instances_{train,val}.json"


def read_coco_json(root: Path, split: str) -> dict:
    path = require(root / "annotations" / f"instances_{split}.json", f"the {split} annotations", COCO_LAYOUT)
    try:
        content = json.loads(path.read_text())
        return {"images": content["images"], "annotations": content["annotations"],
                "categories": content["categories"]}
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise DiscoError(f"{path} is not COCO instances JSON with images, annotations and categories "
                         f"({type(error).__name__}: {error})") from error


CocoRecord = tuple[Path, torch.Tensor, torch.Tensor]  # (image file, boxes xyxy [k, 4], labels [k])


def coco_records(content: dict, image_dir: Path, label_of: dict[int, int]) -> list[CocoRecord]:
    """(file, boxes xyxy, labels) per image, sorted by image id; crowd and empty boxes are skipped."""
    per_image: dict[int, list[dict]] = {image["id"]: [] for image in content["images"]}
    for annotation in content["annotations"]:
        _, _, width, height = annotation["bbox"]
        if not annotation.get("iscrowd", 0) and width > 0 and height > 0:
            per_image.setdefault(annotation["image_id"], []).append(annotation)
    records = []
    for image in sorted(content["images"], key=lambda image: image["id"]):
        found = per_image[image["id"]]
        if any(a["category_id"] not in label_of for a in found):
            raise DiscoError(f"image {image['file_name']} has a category missing from the train categories")
        file = require(image_dir / image["file_name"], "every image named in the annotations", COCO_LAYOUT)
        xywh = torch.tensor([a["bbox"] for a in found], dtype=torch.float).reshape(-1, 4)
        records.append((file, torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1),
                        torch.tensor([label_of[a["category_id"]] for a in found], dtype=torch.long)))
    return records


def coco_detection(root: Path, skip_bad_data: bool = False) -> AnnotatedFolder:
    """A COCO-style folder; labels are the train categories' ids in increasing order, remapped to 1..K.
    skip_bad_data: leave out the images that cannot be decoded (else they are an error)."""
    root = require(Path(root), "a detection folder", COCO_LAYOUT)
    contents = {split: read_coco_json(root, split) for split in ("train", "val")}
    categories = sorted(contents["train"]["categories"], key=lambda category: category["id"])
    label_of = {category["id"]: label for label, category in enumerate(categories, start=1)}
    records = {split: coco_records(contents[split], require(root / split, f"the {split} images", COCO_LAYOUT),
                                   label_of) for split in ("train", "val")}
    if not records["train"]:
        raise DiscoError(f"{root / 'annotations' / 'instances_train.json'} lists no images")
    checked = check_samples(records, lambda record: decode_image(record[0]), skip_bad=skip_bad_data,
                            source=str(root))
    first = checked["train"].images[0]
    channels, size = image_channels(first), first.size
    train, val = (COCODetectionFolder(*_unzip(checked[split].samples, 3), channels, size)
                  for split in ("train", "val"))
    return AnnotatedFolder(train, val, channels, len(categories) + 1, size,
                           ["background", *(category["name"] for category in categories)])


def voc_data(path: Path, request: DataRequest) -> DataSpec:
    """The segmentation task's `data=PATH`: a VOC folder (images keep the first training image's size)."""
    return voc_segmentation(path, request.skip_bad_data).spec(Path(path).name)


def coco_data(path: Path, request: DataRequest) -> DataSpec:
    """The detection task's `data=PATH`: a COCO folder (images keep the first training image's size)."""
    return coco_detection(path, request.skip_bad_data).spec(Path(path).name)
