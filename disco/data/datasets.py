"""Datasets for training and evaluation: Fashion-MNIST (offline from Debian's package) or an ImageFolder.

Both give a DataSpec: train/test datasets of (image tensor, label) plus the number of input channels,
classes and the image size, which the model is adapted to.
"""
from __future__ import annotations

import gzip
import shutil
import sys
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset, TensorDataset
from torchvision import datasets, transforms

from disco.data.checks import CheckedSplit, ImageFile, check_samples, decode_image, two_sizes
from disco.data.recipes import (CROP_FRACTION, IMAGENET_GREY_MEAN, IMAGENET_GREY_STD, IMAGENET_MEAN, IMAGENET_STD,
                                PHOTO_SIDE, PHOTO_SIZE, RECIPES)
from disco.errors import DiscoError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                       "t10k-labels-idx1-ubyte")
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
HOW_TO_GET_FASHION_MNIST = (
    "Fashion-MNIST not found. Install it with `apt-get install dataset-fashion-mnist` (puts it in "
    f"{DEBIAN_FASHION_MNIST}), or run once with internet access so torchvision can download it, "
    "or pass your own data with --data PATH (ImageFolder layout with train/ and val/)")
# Every greyscale PIL mode, with or without alpha (palette "P" images count as colour). The one list that
# decides whether a user's image file gives the model 1 input channel or 3.
GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")


@dataclass
class DataSpec:
    name: str
    train: Dataset
    test: Dataset
    channels: int
    classes: int
    image_size: tuple[int, int]
    class_names: list[str]
    mean: list[float]  # the normalisation applied to every image (needed to read new images the same way)
    std: list[float]
    task: str = "classification"  # a task of disco.tasks.registry: what the targets hold
    crop: bool = False  # test images are resized (shorter side) then centre-cropped to image_size (photo recipe)


@dataclass(frozen=True)
class DataRequest:
    """What a task's data loader is asked for (disco.tasks.registry.Task): the cache folder, the seed, how many
    train/test samples (None: all; a loader that generates samples makes only that many, the rest are cut by
    disco.tasks.data.load_task_data) and image_size (its meaning is the loader's: a resize, a canvas side)."""
    cache: Path | None = None
    seed: int = 0
    train_size: int | None = None
    test_size: int | None = None
    image_size: int | None = None
    skip_bad_data: bool = False  # leave out the user's files that cannot be decoded (else they are an error)
    recipe: str = "auto"  # how a user's images are read (disco/data/recipes.py)


def image_channels(image: Image.Image | ImageFile) -> int:
    """1 for a greyscale image file, else 3: the input channels a model gets for it."""
    return 1 if image.mode in GREY_MODES else 3


WIDE_INTEGER_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")  # 16-bit PNG/TIFF greyscale: values 0..65535


def rgb_image(image: Image.Image) -> Image.Image:
    """8-bit RGB at the file's own scale (`image` itself when it is RGB already: a served image may have 40 million
    pixels, and a copy would double them). `convert("RGB")` clips 16-bit greyscale at 255 (a third of an ordinary
    16-bit photo's pixels turn white): such images are scaled down from 0..65535 first."""
    if image.mode in WIDE_INTEGER_MODES:
        wide = np.asarray(image, dtype=np.int32 if image.mode == "I" else np.uint32)  # range checked before adding
        if wide.size and (wide.min() < 0 or wide.max() > 65535):  # a 32-bit integer image: no scale we can know
            raise DiscoError("integer images beyond 16 bits have no defined range: save the image with 8 or 16 bits")
        wide += 128  # in place: round(x / 257) == (x + 128) // 257 for every integer x in 0..65535
        wide //= 257
        eight_bit = wide.astype(np.uint8)
        del wide  # before the RGB copy below is made: a 40-million-pixel image peaks at 8 bytes a pixel, not 12
        image = Image.fromarray(eight_bit, mode="L")
    elif image.mode == "F":
        raise DiscoError("floating-point images have no defined range: save the image with 8 or 16 bits per channel")
    if image.mode == "RGB":
        image.load()
        return image
    return image.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """ImageFolder's loader, with rgb_image's scaling (a copy where it returned the file's own image: that one is
    closed with the file)."""
    with open(path, "rb") as stream, Image.open(stream) as image:
        converted = rgb_image(image)
        return converted.copy() if converted is image else converted


def default_cache() -> Path:
    return Path.home() / ".cache" / "disco"


def _stage_debian_files(cache: Path) -> Path | None:
    """torchvision's FashionMNIST reads uncompressed raw files: decompress Debian's .gz copies once."""
    if not all((DEBIAN_FASHION_MNIST / f"{name}.gz").is_file() for name in FASHION_MNIST_FILES):
        return None
    raw = cache / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in FASHION_MNIST_FILES:
        target = raw / name
        if not target.is_file():
            with gzip.open(DEBIAN_FASHION_MNIST / f"{name}.gz", "rb") as src, open(f"{target}.part", "wb") as dst:
                shutil.copyfileobj(src, dst)
            Path(f"{target}.part").rename(target)
    return cache


def _as_tensor_dataset(split: datasets.FashionMNIST) -> TensorDataset:
    """Whole split as normalised float tensors in memory: far faster than a PIL transform per item."""
    images = (split.data.unsqueeze(1).float() / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return TensorDataset(images, split.targets.long())


def fashion_mnist_splits(cache: Path | None = None) -> tuple[datasets.FashionMNIST, datasets.FashionMNIST]:
    """torchvision's (train, test) Fashion-MNIST splits: raw uint8 `.data` [N, 28, 28] and `.targets` [N]."""
    cache = cache or default_cache()
    root = _stage_debian_files(cache)
    try:
        if root is not None:
            return tuple(datasets.FashionMNIST(root, train=t, download=False) for t in (True, False))
        return tuple(datasets.FashionMNIST(cache, train=t, download=True) for t in (True, False))
    except (RuntimeError, OSError) as error:
        raise DiscoError(f"{HOW_TO_GET_FASHION_MNIST} ({error})") from error


def fashion_mnist(cache: Path | None = None) -> DataSpec:
    train, test = fashion_mnist_splits(cache)
    return DataSpec("fashion-mnist", _as_tensor_dataset(train), _as_tensor_dataset(test), channels=1,
                    classes=10, image_size=(28, 28), class_names=list(train.classes),
                    mean=[FASHION_MNIST_MEAN], std=[FASHION_MNIST_STD])


def image_transform(channels: int, size: tuple[int, int] | None, mean: list[float], std: list[float],
                    crop: bool = False):
    """RGB PIL image -> normalised tensor with `channels` channels (resized to `size` when given; with `crop`, the
    shorter side resized to size / CROP_FRACTION and the centre cropped to `size`)."""
    steps = [transforms.Grayscale(1)] if channels == 1 else []
    if size and crop:
        steps += [transforms.Resize(round(min(size) / CROP_FRACTION)), transforms.CenterCrop(tuple(size))]
    elif size:
        steps.append(transforms.Resize(tuple(size)))
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(mean, std)])


def training_transform(channels: int, size: tuple[int, int], mean: list[float], std: list[float]):
    """The photo recipe's training images: a random resized crop to `size` and a random horizontal flip."""
    steps = [transforms.Grayscale(1)] if channels == 1 else []
    steps += [transforms.RandomResizedCrop(tuple(size)), transforms.RandomHorizontalFlip()]
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(mean, std)])


def image_folder(path: Path, image_size: int | None = None, *, skip_bad_data: bool = False,
                 recipe: str = "auto") -> DataSpec:
    """`path/train/<class>/*.png` and `path/val/<class>/*.png` (torchvision ImageFolder layout). Every file is
    decoded first (disco.data.checks: a bad one is an error, or left out with skip_bad_data). The "small" recipe
    (RECIPES) resizes images to image_size x image_size when given, else to the first training image's size when
    sizes differ (one line on stderr says so), so that batches stack; the "photo" recipe crops them to
    image_size (default 224) as ImageNet training does."""
    if recipe not in RECIPES:
        raise DiscoError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
    path = Path(path)
    for split in ("train", "val"):
        if not (path / split).is_dir():
            raise DiscoError(f"{path / split} not found: --data expects an ImageFolder layout with train/ and val/ "
                             "sub-folders, one folder per class")
    found = {split: datasets.ImageFolder(path / split) for split in ("train", "val")}
    if not found["train"].samples:
        raise DiscoError(f"no images found under {path / 'train'}")
    if found["train"].classes != found["val"].classes:
        raise DiscoError(f"train/ and val/ of {path} have different class folders")
    checked = check_samples({split: folder.samples for split, folder in found.items()},
                            lambda sample: decode_image(Path(sample[0])), skip_bad=skip_bad_data, source=str(path))
    first = checked["train"].images[0]  # ImageFolder's loader makes everything RGB: the file says grey or not
    channels = image_channels(first)
    if recipe == "photo" or (recipe == "auto" and min(first.size) >= PHOTO_SIDE):
        return _photo_folder(path, found, checked, channels, image_size or PHOTO_SIZE)
    size = (image_size, image_size) if image_size else first.size
    resize = image_size is not None or _resize_mixed_sizes(path, checked)
    transform = image_transform(channels, size if resize else None, [0.5] * channels, [0.5] * channels)
    train, test = (_usable_image_folder(found[split].root, checked[split], transform) for split in ("train", "val"))
    return DataSpec(path.name, train, test, channels=channels, classes=len(train.classes), image_size=size,
                    class_names=train.classes, mean=[0.5] * channels, std=[0.5] * channels)


def _photo_folder(path: Path, found: dict, checked: dict[str, CheckedSplit], channels: int, side: int) -> DataSpec:
    """The photo recipe (see RECIPES)."""
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else (IMAGENET_GREY_MEAN, IMAGENET_GREY_STD)
    size = (side, side)
    train = _usable_image_folder(found["train"].root, checked["train"], training_transform(channels, size, mean, std))
    test = _usable_image_folder(found["val"].root, checked["val"], image_transform(channels, size, mean, std, True))
    return DataSpec(path.name, train, test, channels=channels, classes=len(train.classes), image_size=size,
                    class_names=train.classes, mean=mean, std=std, crop=True)


def _resize_mixed_sizes(path: Path, checked: dict[str, CheckedSplit]) -> bool:
    """True (and one line on stderr) when the images of `path` differ in size: all are then resized to the first
    training image's size, which deployment inputs are resized to as well (the manifest's preprocess)."""
    mixed = two_sizes(chain(checked["train"].images, checked["val"].images))
    if mixed:
        first, other = mixed
        print(f"{path}: images differ in size ({first}, {other}): all are resized to the first training image's "
              f"{first.size[1]}x{first.size[0]}; pass --image-size N to choose the size", file=sys.stderr)
    return mixed is not None


def _usable_image_folder(root: str, checked: CheckedSplit, transform) -> datasets.ImageFolder:
    """The ImageFolder at `root` holding only the samples that passed the check (a class left without any is
    kept empty, so that class indices stay those of the folder names)."""
    usable = {file for file, _ in checked.samples}
    return datasets.ImageFolder(root, transform=transform, is_valid_file=usable.__contains__, allow_empty=True,
                                loader=load_rgb)


def load_dataset(dataset: str | None = "fashion-mnist", data: Path | None = None, *, cache: Path | None = None,
                 image_size: int | None = None, skip_bad_data: bool = False, recipe: str = "auto") -> DataSpec:
    """The named dataset, or the user's ImageFolder at `data` (which takes precedence)."""
    if data is not None:
        return image_folder(Path(data), image_size, skip_bad_data=skip_bad_data, recipe=recipe)
    if dataset == "fashion-mnist":
        return fashion_mnist(cache)
    raise DiscoError(f"unknown dataset {dataset!r}; known: fashion-mnist (or give --data PATH)")


def subset(dataset: Dataset, count: int | None, seed: int = 0) -> Dataset:
    """A fixed random subset of `count` samples (all when None): quick runs and tests."""
    if count is None or count >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count]
    return Subset(dataset, order.tolist())
