"""The task registry: one Task per task, read by data loading, models, training config and the CLI."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageMode
from torch.utils.data import TensorDataset

from disco.cli.main import build_parser
from disco.data.datasets import GREY_MODES, DataSpec, image_channels
from disco.tasks.data import load_task_data
from disco.errors import DiscoError
from disco.models import build_model, builtin_models
from disco.tasks import registry
from disco.tasks.classification import ClassificationObjective
from disco.tasks.registry import Task, get_task, register_task, task_names
from disco.training.config import TrainConfig


def test_builtin_tasks_in_order_with_their_metric_data_and_models():
    assert task_names() == ("classification", "segmentation", "detection", "superres")
    assert [get_task(t).metric_name for t in task_names()] == ["accuracy", "miou", "map", "psnr"]
    assert get_task("superres").default_dataset == "fashion-mnist" and list(get_task("superres").datasets) == \
        ["fashion-mnist", "photos"]
    assert list(builtin_models()) == ["vit_small", "fcn_resnet18", "retinanet_resnet18", "edsr"]


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(DiscoError, match="unknown task 'depth'; known: classification, segmentation, detection"):
        get_task("depth")


def _tiny_data(request) -> DataSpec:
    images = torch.rand(6, 1, 8, 8)
    return DataSpec("tiny", TensorDataset(images, images), TensorDataset(images, images), channels=1, classes=0,
                    image_size=(8, 8), class_names=[], mean=[0.0], std=[1.0])


def _tiny_model(num_classes: int = 0, in_channels: int = 1) -> torch.nn.Module:
    return torch.nn.Conv2d(in_channels, in_channels, 3, padding=1)


@pytest.fixture
def denoising(monkeypatch):
    """A new task: one Task registered (on a copy of the registry, restored after the test)."""
    monkeypatch.setattr(registry, "_TASKS", dict(registry._TASKS))
    return register_task(Task("denoising", ClassificationObjective, lambda output, names, **_: [],
                              datasets={"tiny": _tiny_data}, load_folder=lambda path, request: _tiny_data(request),
                              folder_layout="a folder of noisy images", models={"tiny_denoiser": _tiny_model}))


def test_a_registered_task_is_known_everywhere(denoising, tmp_path, capsys):
    assert "denoising" in task_names()
    spec = load_task_data("denoising", train_size=4)
    assert (spec.task, spec.name, len(spec.train), len(spec.test)) == ("denoising", "tiny", 4, 6)
    assert isinstance(build_model("disco:tiny_denoiser"), torch.nn.Conv2d)
    assert TrainConfig(model="disco:tiny_denoiser", task="denoising", out=str(tmp_path)).dataset == "tiny"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "superres,denoising}" in help_text and "a folder of noisy images for denoising" in help_text


def test_a_task_or_model_name_is_registered_once(denoising):
    with pytest.raises(DiscoError, match="already registered"):
        register_task(denoising)
    with pytest.raises(DiscoError, match="disco:edsr is already brought by task 'superres'"):
        register_task(Task("other", ClassificationObjective, denoising.describe, datasets={"tiny": _tiny_data},
                           load_folder=denoising.load_folder, folder_layout="-", models={"edsr": _tiny_model}))


def test_grey_modes_are_every_greyscale_pil_mode(tmp_path):
    greyscale = {m for m in ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F", "P", "PA", "RGB",
                             "RGBA", "CMYK", "YCbCr") if ImageMode.getmode(m).basemode == "L"}
    assert set(GREY_MODES) == greyscale
    for mode, channels in (("L", 1), ("LA", 1), ("I;16", 1), ("F", 1), ("1", 1), ("P", 3), ("RGB", 3)):
        Image.new(mode, (4, 4)).save(tmp_path / "image.tiff")
        with Image.open(tmp_path / "image.tiff") as image:
            assert image_channels(image) == channels, mode
    Image.fromarray(np.zeros((4, 4), np.uint16)).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as image:
        assert image_channels(image) == 1
