"""Dense prediction (segmentation, detection, super-resolution): split models against the originals,
hand-zeroed references and hook counts; distributed runs against the simulation; detection decoding
against torchvision's own RetinaNet; short training runs of every task through the one pipeline."""
from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from torch.utils._pytree import tree_leaves

import disco
from disco.errors import DiscoError
from disco.models import build_for_data
from disco.split.masks import keep_random_groups
from disco.training import pipeline
from disco.training.config import TrainConfig
from reference import hand_zeroed, hook_count
from runtime_helpers import disco_cli, make_deployment

# spec, input channels, classes, input size
MODELS = {
    "segmentation": ("disco:fcn_resnet18", 1, 11, 64),
    "detection": ("disco:retinanet_resnet18", 1, 11, 96),
    "superres": ("disco:edsr", 3, 0, 24),
}


def _model(task: str) -> tuple[torch.nn.Module, torch.Tensor]:
    spec, channels, classes, size = MODELS[task]
    model = build_for_data(spec, channels=channels, classes=classes).eval()
    with torch.no_grad():  # informative BatchNorm statistics and non-zero heads
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model, torch.randn(2, channels, size, size)


def _close(actual, expected, atol=1e-4):
    for a, e in zip(tree_leaves(actual), tree_leaves(expected), strict=True):
        torch.testing.assert_close(a, e, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("task,nodes", [("segmentation", 2), ("segmentation", 4), ("detection", 2),
                                        ("detection", 4), ("superres", 2), ("superres", 3)])
def test_dense_partition_equals_original(task, nodes):
    model, x = _model(task)
    simulated = disco.partition(model, nodes=nodes, example_inputs=x[:1]).eval()
    with torch.no_grad():
        _close(simulated(x), model(x))


@pytest.mark.parametrize("task,nodes", [("segmentation", 2), ("detection", 3), ("superres", 3)])
def test_groups_removed_equal_hand_zeroed_reference_and_bytes_equal_hook_count(task, nodes):
    model, x = _model(task)
    simulated = disco.partition(model, nodes=nodes, example_inputs=x[:1]).eval()
    keep_random_groups(simulated, 0.3, seed=nodes)
    reference = hand_zeroed(model, simulated)
    with torch.no_grad():
        _close(simulated(x), reference(x))
    report = disco.cost_report(simulated, x[:1])
    assert report.traffic.bytes_matrix == hook_count(model, simulated, x[:1], 4)
    assert 0.2 < report.traffic.ratio < 0.4


def test_pixel_shuffle_keeps_each_run_of_channels_on_one_node():
    """3 nodes do not divide EDSR's 128 upsampler channels evenly; PixelShuffle's runs of 4 stay whole."""
    model, x = _model("superres")
    simulated = disco.partition(model, nodes=3, example_inputs=x[:1])
    runs = simulated.upsample[0].out_assign.reshape(-1, 4)
    assert bool((runs == runs[:, :1]).all())
    assert sorted(set(runs[:, 0].tolist())) == [0, 1, 2]


@pytest.mark.parametrize("task,nodes,expected_text", [("segmentation", 2, " px"), ("detection", 2, "objects"),
                                                      ("superres", 3, "upscaled image 3x48x48")])
def test_distributed_output_equals_simulation(tmp_path, task, nodes, expected_text):
    spec, channels, classes, size = MODELS[task]
    deployment = make_deployment(tmp_path, spec, nodes, size=size, images=2, channels=channels, classes=classes)
    assert json.loads((tmp_path / "manifest.json").read_text())["task"] == task
    result = disco_cli("run", str(tmp_path), "--input", str(deployment.input_file), "--batch-size", "2",
                       "--save-output", str(tmp_path / "y.safetensors"), "--summary", str(tmp_path / "s.json"))
    assert result.returncode == 0, result.stderr
    assert expected_text in result.stdout
    saved = safetensors.torch.load_file(str(tmp_path / "y.safetensors"))
    with torch.no_grad():
        expected = tree_leaves(deployment.simulated(deployment.inputs))
    names = ["output"] if len(expected) == 1 else [f"output.{i}" for i in range(len(expected))]
    _close([saved[n] for n in names], expected)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["bytes_sent"]["activations"] == [[b * 2 for b in row] for row in deployment.costs.traffic.bytes_matrix]


def test_detection_decoding_equals_torchvision_retinanet():
    """Node 0 decodes the split model's head maps with torchvision's own code: same boxes as RetinaNet's
    eval forward (whose transform is the identity for 96x96 images with mean 0, std 1)."""
    model, x = _model("detection")
    with torch.no_grad():
        head = model.detector.head.classification_head.cls_logits
        head.bias.fill_(0.0)  # scores around 0.5: plenty of detections to compare
        ours = model.detect(model(x), (96, 96))
        theirs = model.detector(list(x))
    assert sum(len(d["boxes"]) for d in ours) > 10
    for a, b in zip(ours, theirs, strict=True):
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("task", ["segmentation", "detection", "superres"])
def test_short_training_lowers_the_loss_and_meets_the_budget(tmp_path, task):
    spec = MODELS[task][0]
    config = TrainConfig(model=spec, task=task, out=str(tmp_path / "run"), nodes=2, budget=0.2, dense_epochs=2,
                         sparsify_epochs=1, finetune_epochs=1, batch_size=16, lr=2e-3, train_subset=48,
                         test_subset=16, min_phase_steps=0)
    report = pipeline.train(config)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    dense = [m["train_loss"] for m in metrics if m["phase"] == "dense"]
    assert dense[1] < dense[0]
    assert 0.196 <= report["ratio"] <= 0.2
    assert report["task"] == task and report["metric"] == {"segmentation": "miou", "detection": "map",
                                                           "superres": "psnr"}[task]
    assert all(f"test_{report['metric']}" in m for m in metrics)


def test_detection_needs_a_detector(tmp_path):
    with pytest.raises(DiscoError, match="needs a detector"):
        pipeline.train(TrainConfig(model="torchvision:resnet18", task="detection", out=str(tmp_path / "run"),
                                   nodes=2, train_subset=4, test_subset=4))


def test_unknown_task_is_refused():
    with pytest.raises(DiscoError, match="unknown --task"):
        TrainConfig(model="disco:edsr", task="colouring", out="/tmp/never")


def test_trained_task_run_exports_and_scores_the_same_distributed(tmp_path):
    """disco train -> disco export -> disco run --eval: the 2-process PSNR equals the run's report."""
    config = TrainConfig(model="disco:edsr", task="superres", out=str(tmp_path / "run"), nodes=2, budget=0.2,
                         dense_epochs=1, sparsify_epochs=1, finetune_epochs=1, batch_size=16, train_subset=48,
                         test_subset=24, min_phase_steps=0)
    report = pipeline.train(config)
    exported = disco_cli("export", str(tmp_path / "run"), "--out", str(tmp_path / "deploy"))
    assert exported.returncode == 0, exported.stderr
    result = disco_cli("run", str(tmp_path / "deploy"), "--eval", "--summary", str(tmp_path / "s.json"))
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["metric"] == "psnr" and summary["images"] == 24
    assert summary["score"] == pytest.approx(report["disco_score"], abs=1e-4)
    assert f"psnr on 24 test images: {summary['score']:.4f} (simulation: {report['disco_score']:.4f})" in result.stdout
