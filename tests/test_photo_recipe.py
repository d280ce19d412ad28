"""Photographs (`--recipe photo`, chosen by `auto` for large images): ImageNet's training and evaluation
transforms, and a deployment that reads new images exactly as evaluation did."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from disco.data.datasets import image_folder
from disco.errors import DiscoError
from disco.export.manifest import Manifest
from disco.runtime.inputs import image_tensor
from disco.training import pipeline
from disco.training.config import TrainConfig
from tests_helpers import tiny_model_spec


def _photo(height: int, width: int, seed: int) -> Image.Image:
    """A red frame 24 pixels wide around a blue, noisy middle."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = 255
    pixels[24:-24, 24:-24] = [0, 0, 200]
    pixels[24:-24, 24:-24, 2] += rng.integers(0, 50, (height - 48, width - 48), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for split, count in (("train", 6), ("val", 3)):
        for label in range(2):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                _photo(160, 200, seed=10 * label + i).save(folder / f"{i}.png")
    return root


def test_large_images_get_the_photo_recipe(photos):
    data = image_folder(photos)  # auto: the shorter side (160) is at least 128
    assert data.crop and data.image_size == (224, 224) and data.mean == [0.485, 0.456, 0.406]
    image, _ = data.test[0]
    assert image.shape == (3, 224, 224)
    red = (image[0] * 0.229 + 0.485) > 0.9  # un-normalised red channel near 1: the frame
    # 160x200 resized to 256x320 (frame 24 -> 38 px), the centre 224x224 cropped: 22 px of frame left at the top
    # and bottom, none at the sides (48 px cut there)
    assert bool(red[:10, :].all()) and bool(red[-10:, :].all())
    assert not bool(red[40:-40, :].any())
    torch.manual_seed(0)
    first = data.train[0][0]
    torch.manual_seed(1)
    assert first.shape == (3, 224, 224) and not torch.equal(first, data.train[0][0])  # random crops and flips
    assert torch.equal(data.test[0][0], data.test[0][0])


def test_the_small_recipe_only_resizes(photos):
    data = image_folder(photos, 64, recipe="small")
    image, _ = data.test[0]
    assert not data.crop and image.shape == (3, 64, 64)
    red = (image[0] * 0.5 + 0.5) > 0.9
    assert bool(red[0, :].all()) and bool(red[:, 0].all())  # the frame is all there
    with pytest.raises(DiscoError, match="unknown recipe"):
        image_folder(photos, recipe="imagenet-9000")


def test_a_deployment_reads_new_photos_as_evaluation_did(photos, tmp_path):
    """Trained with the photo recipe at 32x32 (fast), exported: `disco run --input`'s and `disco serve`'s reading
    of an image file (image_tensor) equals the test split's tensor of the same file, and --eval reloads the same."""
    from disco.training.export_run import export_run

    config = TrainConfig(model=tiny_model_spec(), data=str(photos), image_size=32, out=str(tmp_path / "run"),
                         nodes=2, budget=0.5, dense_epochs=1, sparsify_epochs=1, finetune_epochs=1, batch_size=4,
                         min_phase_steps=0)
    pipeline.train(config)
    manifest = export_run(tmp_path / "run", tmp_path / "deploy")
    assert manifest.preprocess["crop"] is True and manifest.dataset["recipe"] == "auto"
    data = TrainConfig.load(tmp_path / "run" / "config.json").load_data()
    with Image.open(data.test.samples[0][0]) as image:  # the whole val split: no subset
        read = image_tensor(image, Manifest.load(tmp_path / "deploy"))
    assert torch.equal(read, data.test[0][0])
