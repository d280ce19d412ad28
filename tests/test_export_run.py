"""A trained run folder, exported (in this process: `disco export` starts no ranks) and run on 2 processes: same
accuracy and predictions as the simulation."""
import json
import re

import pytest
import safetensors.torch
import torch

import disco
from disco.data.datasets import load_dataset
from disco.export.manifest import Manifest
from disco.models import build_for_data
from disco.training import pipeline
from disco.training.checkpoint import load_model_state
from disco.training.config import TrainConfig
from reference import hook_count
from runtime_helpers import disco_cli, disco_here
from synthetic import make_image_folder
from tests_helpers import tiny_model_file, tiny_model_spec


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    images = make_image_folder(root / "images")
    config = TrainConfig(model=tiny_model_spec(), data=str(images), out=str(root / "run"), nodes=2, budget=0.3,
                         dense_epochs=2, sparsify_epochs=1, finetune_epochs=1, batch_size=16, lr=1e-2, seed=0,
                         min_phase_steps=0)
    report = pipeline.train(config)
    return root, images, report


def test_export_writes_shards_and_manifest(trained, capsys):
    root, _, report = trained
    result = disco_here(capsys, "export", str(root / "run"), "--out", str(root / "deploy"))
    assert result.returncode == 0, result.stderr
    manifest = Manifest.load(root / "deploy")
    assert manifest.nodes == 2 and manifest.expected_at(0).bytes == report["bytes_per_image"]
    # independent count: the trained weights and masks rebuilt from the run, every sent channel seen by hooks
    spec = manifest.model
    original = build_for_data(tiny_model_spec(), channels=spec.channels, classes=spec.classes, **spec.kwargs).eval()
    x = torch.zeros(1, spec.channels, *manifest.input_shape[1:])
    simulated = disco.partition(original, nodes=2, example_inputs=x)
    load_model_state(simulated, root / "run" / "disco.safetensors")
    assert manifest.expected_at(0).bytes_matrix == hook_count(original, simulated, x, 4)
    assert 0 < report["bytes_per_image"] < report["dense_bytes_per_image"]  # the masks dropped groups
    assert [s["file"] for s in manifest.shards] == ["node0.safetensors", "node1.safetensors"]
    assert manifest.reference["accuracy"] == report["disco_accuracy"]


def test_distributed_eval_of_a_signed_export_matches_the_simulation(trained, capsys):
    root, _, report = trained
    assert disco_here(capsys, "keygen", "--out", str(root / "keys")).returncode == 0
    exported = disco_here(capsys, "export", str(root / "run"), "--out", str(root / "signed"), "--sign-key",
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


def test_images_from_a_folder_are_read_like_the_training_data(trained, capsys):
    root, images, _ = trained
    if not (root / "deploy").is_dir():
        assert disco_here(capsys, "export", str(root / "run"), "--out", str(root / "deploy")).returncode == 0
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
    named = re.findall(r"^(\d+)\.png: (class_\d) \(", result.stdout, flags=re.M)  # printed with class names
    classes = [f"class_{int(i)}" for i in expected.argmax(1)]
    assert sorted(named, key=lambda n: int(n[0])) == [(f.stem, c) for f, c in sorted(zip(files, classes),
                                                                                     key=lambda fc: int(fc[0].stem))]


def test_export_at_another_dtype_warns_with_the_measured_change_and_runs_as_measured(trained, capsys):
    root, _, report = trained
    result = disco_here(capsys, "export", str(root / "run"), "--out", str(root / "int4"), "--dtype", "int4")
    assert result.returncode == 0, result.stderr
    warning = next(line for line in result.stderr.splitlines() if line.startswith("warning:"))
    assert "trained for fp32 messages; exported as int4" in warning
    before, after = (float(word) for word in warning.split(" goes from ")[1].split(" (")[0].split(" to "))
    assert before == pytest.approx(report["disco_accuracy"], abs=1e-4)
    summary = root / "int4.json"
    ran = disco_cli("run", str(root / "int4"), "--eval", "--summary", str(summary), "--model-code", tiny_model_file())
    assert ran.returncode == 0, ran.stderr
    assert json.loads(summary.read_text())["accuracy"] == pytest.approx(after, abs=1e-4)  # as the warning said
    assert Manifest.load(root / "int4").transport_dtype == "int4"


def test_a_run_trained_for_int8_counts_and_sends_int8_bytes(tmp_path, capsys):
    images = make_image_folder(tmp_path / "images")
    config = TrainConfig(model=tiny_model_spec(), data=str(images), out=str(tmp_path / "run"), nodes=2, budget=0.3,
                         dense_epochs=1, sparsify_epochs=1, finetune_epochs=1, batch_size=16, lr=1e-2, seed=0,
                         transport_dtype="int8", min_phase_steps=0)
    report = pipeline.train(config)
    exported = disco_here(capsys, "export", str(tmp_path / "run"), "--out", str(tmp_path / "deploy"))
    assert exported.returncode == 0 and "warning" not in exported.stderr, exported.stderr
    summary = tmp_path / "eval.json"
    ran = disco_cli("run", str(tmp_path / "deploy"), "--eval", "--summary", str(summary), "--model-code",
                    tiny_model_file())
    assert ran.returncode == 0, ran.stderr
    data = json.loads(summary.read_text())
    assert data["accuracy"] == pytest.approx(report["disco_accuracy"], abs=1e-6)  # trained with the rounding on
    assert data["bytes_per_image"]["activations"] == report["bytes_per_image"]
    assert report["transport_dtype"] == "int8"
