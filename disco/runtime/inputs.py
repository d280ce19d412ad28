"""What node 0 feeds the distributed model: image files, a folder of them, a tensor file, or the
dataset's test split (`--eval`). Images are read the way the training data was (manifest.preprocess)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import safetensors.torch
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader

from disco.data.datasets import image_transform, rgb_image, subset
from disco.tasks.data import load_task_data
from disco.errors import DiscoError
from disco.export.manifest import Manifest

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class Batch:
    images: torch.Tensor
    labels: object  # with --eval: the task's targets (class labels, masks, boxes, images); else None
    names: list[str]


def check_input(x: torch.Tensor, manifest: Manifest) -> None:
    """Refuse (on node 0, before anything is sent) input the deployed model was not built for."""
    expected = tuple(manifest.input_shape)
    if not isinstance(x, torch.Tensor) or x.dim() != len(expected) + 1 or tuple(x.shape[1:]) != expected:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise DiscoError(f"input of shape {shape} does not fit the deployed model, which takes "
                         f"[batch, {', '.join(map(str, expected))}] (channels {expected[0]})")
    if x.dtype != torch.float32:
        raise DiscoError(f"input dtype {x.dtype} is not supported: give float32 images")
    if not bool(torch.isfinite(x).all()):
        raise DiscoError("input holds NaN or infinite values")


def image_tensor(image: Image.Image, manifest: Manifest) -> torch.Tensor:
    """A decoded image as the model's input [C, H, W], read the way its training data was (manifest.preprocess:
    channels, size, normalisation): `disco run --input` and `disco serve` both read images here."""
    if manifest.preprocess is None:
        raise DiscoError("this deployment has no image preprocessing recorded (it was not exported from a "
                         "training run); give a .safetensors tensor file")
    p = manifest.preprocess
    return image_transform(p["channels"], p["size"], p["mean"], p["std"], bool(p.get("crop", False)))(
        rgb_image(image))


def _read_image(path: Path, manifest: Manifest) -> torch.Tensor:
    try:
        with Image.open(path) as image:
            return image_tensor(image, manifest)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise DiscoError(f"cannot read image {path}: {error}") from error


def _tensor_file(path: Path) -> torch.Tensor:
    try:
        tensors = safetensors.torch.load_file(str(path))
    except Exception as error:  # safetensors' own errors name no file
        raise DiscoError(f"cannot read {path} as safetensors ({type(error).__name__}: {error})") from None
    if "input" not in tensors:
        raise DiscoError(f"{path} must hold a tensor named 'input' of shape [batch, channels, height, width]")
    return tensors["input"]


def _regular_or_folder(path: Path) -> None:
    """A FIFO would block rank 0 while its peers wait to join (their error would then blame them), and a device
    such as /dev/zero never ends: inputs are regular files (or links to them) and folders."""
    if not (path.is_file() or path.is_dir()):
        raise DiscoError(f"input {path} is not a regular file (a FIFO, socket or device?): give image files, a "
                         "folder of them or a .safetensors file")


def file_batches(path: str | Path, manifest: Manifest, batch_size: int) -> list[Batch]:
    """An image, a folder of images (sorted by name) or a .safetensors file with a tensor 'input'."""
    path = Path(path)
    if not path.exists():
        raise DiscoError(f"input not found: {path}")
    _regular_or_folder(path)
    if path.suffix == ".safetensors":
        images = _tensor_file(path)
        check_input(images, manifest)
        return [Batch(chunk, None, [f"{path.name}[{i + start}]" for i in range(len(chunk))])
                for start, chunk in zip(range(0, len(images), batch_size), images.split(batch_size))]
    files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else [path]
    for file in files:
        _regular_or_folder(file)
    if not files:
        raise DiscoError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {path}")
    batches = []
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        images = torch.stack([_read_image(f, manifest) for f in chunk])
        check_input(images, manifest)
        batches.append(Batch(images, None, [f.name for f in chunk]))
    return batches


def eval_batches(manifest: Manifest, batch_size: int, limit: int | None, collate=None) -> Iterator[Batch]:
    """The test split of the dataset the model was trained on (the same subset its report used; `limit`:
    that many of them), batched with the task's `collate` (targets: labels, masks, boxes or images)."""
    if manifest.dataset is None:
        raise DiscoError("this deployment does not record its dataset; export it from a training run for --eval")
    d = manifest.dataset
    # the same test_subset and seed give the images the report scored (scenes are generated per index)
    data = load_task_data(manifest.task, d["dataset"], d["data"], seed=d.get("seed", 0),
                          test_size=d.get("test_subset"), image_size=d["image_size"],
                          skip_bad_data=d.get("skip_bad_data", False), recipe=d.get("recipe", "auto"))
    test = subset(data.test, limit, d.get("seed", 0))
    for images, targets in DataLoader(test, batch_size=batch_size, collate_fn=collate):
        check_input(images, manifest)
        yield Batch(images, targets, [])
