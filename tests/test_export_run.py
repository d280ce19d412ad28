"""A trained run folder, exported and run on 2 processes: same accuracy and predictions as the simulation."""
import json

import pytest
import safetensors.torch
import torch

from disco.data.datasets import load_dataset
from disco.export.manifest import Manifest
from disco.training import pipeline
from disco.training.config import TrainConfig
from runtime_helpers import disco_cli
from synthetic import make_image_folder
from tests_helpers import tiny_model_file, tiny_model_spec


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    images = make_image_folder(root / "images")
    config = TrainConfig(model=tiny_model_spec(), data=str(images), out=str(root / "run"), nodes=2, budget=0.3,
                         dense_epochs=2, sparsify_epochs=1, finetune_epochs=1, batch_size=16, lr=1e-2, seed=0)
    report = pipeline.train(config)
    return root, images, report


def test_export_writes_shards_and_manifest(trained):
    root, _, report = trained
    result = disco_cli("export", str(root / "run"), "--out", str(root / "deploy"))
    assert result.returncode == 0, result.stderr
    manifest = Manifest.load(root / "deploy")
    assert manifest.nodes == 2 and manifest.expected["bytes"] == report["bytes_per_image"]
    assert [s["file"] for s in manifest.shards] == ["node0.safetensors", "node1.safetensors"]
    assert manifest.reference["accuracy"] == report["disco_accuracy"]


def test_distributed_eval_of_a_signed_export_matches_the_simulation(trained):
    root, _, report = trained
    assert disco_cli("keygen", "--out", str(root / "keys")).returncode == 0
    exported = disco_cli("export", str(root / "run"), "--out", str(root / "signed"), "--sign-key",
                         str(root / "keys" / "disco-sign.key"))
    assert exported.returncode == 0 and "signed: manifest.sig" in exported.stdout, exported.stderr
    summary = root / "eval.json"
    result = disco_cli("run", str(root / "signed"), "--eval", "--batch-size", "7", "--summary", str(summary),
                       "--model-code", tiny_model_file(), "--verify-key", str(root / "keys" / "disco-sign.pub"))
    assert result.returncode == 0, result.stderr
    data = json.loads(summary.read_text())
    assert data["accuracy"] == pytest.approx(report["disco_accuracy"], abs=1e-6)
    assert data["bytes_per_image"]["activations"] == report["bytes_per_image"]
    assert "accuracy on 60 test images" in result.stdout


def test_images_from_a_folder_are_read_like_the_training_data(trained):
    root, images, _ = trained
    if not (root / "deploy").is_dir():
        assert disco_cli("export", str(root / "run"), "--out", str(root / "deploy")).returncode == 0
    folder = images / "val" / "class_1"
    out = root / "predicted.safetensors"
    result = disco_cli("run", str(root / "deploy"), "--input", str(folder), "--batch-size", "4",
                       "--save-output", str(out), "--model-code", tiny_model_file())
    assert result.returncode == 0, result.stderr
    # reference: the simulation model on the dataset's own tensors for the same files
    from disco.models import build_for_data
    from disco.split.partitioner import partition
    from disco.training import checkpoint
    data = load_dataset(data=images)
    files = sorted(folder.iterdir())
    index = {path: i for i, (path, _) in enumerate(data.test.samples)}
    x = torch.stack([data.test[index[str(f)]][0] for f in files])
    model = build_for_data(tiny_model_spec(), channels=data.channels, classes=data.classes)
    simulated = partition(model, nodes=2, example_inputs=x[:1]).eval()
    checkpoint.load_model_state(simulated, root / "run" / "disco.safetensors")
    with torch.no_grad():
        expected = simulated(x)
    torch.testing.assert_close(safetensors.torch.load_file(str(out))["output"], expected, atol=1e-4, rtol=1e-4)
    assert "class_1" in result.stdout  # predictions printed with class names
