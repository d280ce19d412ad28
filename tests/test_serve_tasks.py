"""`disco serve` for a dense-prediction task: the segmentation mask it returns (as PNG and as pixel counts) equals
the argmax of the simulation's output on the same image files, read as `disco run` reads them."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from disco.export.manifest import Manifest
from disco.runtime.inputs import image_tensor
from runtime_helpers import make_deployment
from serve_helpers import Served

CLASSES = ["background", *(f"item {i}" for i in range(1, 5))]
PREPROCESS = {"channels": 3, "size": [32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("segmenter")
    deployment = make_deployment(folder / "deploy", "disco:fcn_resnet18", 2, classes=len(CLASSES),
                                 preprocess=PREPROCESS, class_names=CLASSES)
    pictures = folder / "pictures"
    pictures.mkdir()
    rng = np.random.default_rng(3)
    for index, size in enumerate(((32, 32), (48, 40))):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(pictures / f"{index}.png")
    manifest = Manifest.load(deployment.folder)
    inputs = torch.stack([image_tensor(Image.open(path), manifest) for path in sorted(pictures.iterdir())])
    with torch.no_grad():
        masks = deployment.simulated(inputs).argmax(1)
    service = Served(deployment.folder, "--timeout", "20", log=folder / "serve.log")
    try:
        service.wait_ready()
        yield service, sorted(pictures.iterdir()), masks
    finally:
        service.stop()


def test_the_mask_equals_the_simulation_as_png_and_in_json(segmenter):
    service, pictures, masks = segmenter
    for picture, expected in zip(pictures, masks):
        png = service.predict(picture.read_bytes(), format="png")
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert torch.equal(torch.from_numpy(np.array(Image.open(io.BytesIO(png.content)))).long(), expected)
        answer = service.predict(picture.read_bytes()).json()
        classes, counts = expected.unique(return_counts=True)
        assert answer["pixels_per_class"] == {CLASSES[int(c)]: int(n) for c, n in zip(classes, counts)}
        assert answer["mask_size"] == [32, 32] and "mask_png" not in answer
