"""The training pipeline end to end on a small ImageFolder: phases, resume, distillation, reports, errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from disco.data.datasets import DEBIAN_FASHION_MNIST, load_dataset
from disco.errors import DiscoError
from disco.training import checkpoint, pipeline
from disco.training.config import TrainConfig
from synthetic import make_image_folder
from tests_helpers import tiny_model_spec


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


def _config(folder, out, **overrides):
    values = dict(model=tiny_model_spec(), data=str(folder), out=str(out), nodes=2, budget=0.2, dense_epochs=2,
                  sparsify_epochs=2, finetune_epochs=1, batch_size=16, lr=1e-2, seed=0,
                  min_phase_steps=0)  # tiny data: the phases as asked
    values.update(overrides)
    return TrainConfig(**values)


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _without_time(metrics):
    return [{k: v for k, v in m.items() if k not in ("seconds", "train_seconds")} for m in metrics]


def _masks(path):
    return {k: v for k, v in safetensors.torch.load_file(str(path)).items() if k.endswith("group_mask")}


def test_image_folder_sets_channels_and_classes(folder):
    data = load_dataset(data=folder)
    assert (data.channels, data.classes, data.image_size) == (1, 3, (16, 16))
    assert len(data.train) == 120 and len(data.test) == 60


def test_full_run_meets_budget_lowers_loss_and_writes_reports(folder, tmp_path):
    report = pipeline.train(_config(folder, tmp_path / "run"))
    out = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "dense.safetensors", "disco.safetensors", "report.json",
                 "report.md"):
        assert (out / name).is_file(), name
    metrics = _metrics(out)
    assert [m["phase"] for m in metrics] == ["dense", "dense", "sparsify", "sparsify", "finetune"]
    assert metrics[1]["train_loss"] < metrics[0]["train_loss"]
    # within 2% needs many small groups (tested on resnet18 in test_sparsify); this toy's smallest layer groups
    # are 1/12 of the budget, so only a looser lower bound holds here
    assert 0.15 <= report["ratio"] <= 0.2
    assert report["disco_accuracy"] > 0.5  # three easy classes: far above chance
    assert json.loads((out / "report.json").read_text()) == report
    text = (out / "report.md").read_text()
    assert "accuracy: dense" in text
    # each side's training, as the metrics saw it: 2 dense epochs, then 2 sparsify + 1 fine-tune for DISCO
    epochs = {k: report["training"][k] for k in ("dense_epochs", "dense_weights", "sparsify_epochs", "finetune_epochs")}
    assert epochs == {"dense_epochs": 2, "dense_weights": None, "sparsify_epochs": 2, "finetune_epochs": 1}
    assert "dense model 2 epochs; DISCO starts from it and trains 2 sparsify + 1 fine-tune epochs more" in text
    assert ("DISCO had 3 more epochs" in text) == (report["disco_accuracy"] > report["dense_accuracy"])


def test_masks_frozen_during_finetuning(folder, tmp_path):
    out = tmp_path / "run"
    stopped = pipeline.train(_config(folder, out), stop_after_epochs=4)  # dense 2 + sparsify 2
    assert stopped["stopped"]
    after_sparsify = _masks(checkpoint.latest_checkpoint(out).folder / "model.safetensors")
    pipeline.resume(out)
    final = _masks(out / "disco.safetensors")
    assert after_sparsify.keys() == final.keys() and after_sparsify
    for key in final:
        assert torch.equal(final[key], after_sparsify[key]), key


def test_resume_continues_where_it_stopped(folder, tmp_path):
    whole = tmp_path / "whole"
    pipeline.train(_config(folder, whole))
    parted = tmp_path / "parted"
    assert pipeline.train(_config(folder, parted), stop_after_epochs=3)["stopped"]
    assert len(_metrics(parted)) == 3
    pipeline.resume(parted)
    assert _without_time(_metrics(parted)) == _without_time(_metrics(whole))
    final_whole = safetensors.torch.load_file(str(whole / "disco.safetensors"))
    final_parted = safetensors.torch.load_file(str(parted / "disco.safetensors"))
    assert final_parted.keys() == final_whole.keys()
    for key, value in final_whole.items():
        assert torch.equal(final_parted[key], value), key


def test_distillation_is_used_when_asked(folder, tmp_path, monkeypatch):
    calls = []
    original = pipeline.DistillationLoss.__call__

    def spy(self, *args):
        calls.append(1)
        return original(self, *args)
    monkeypatch.setattr(pipeline.DistillationLoss, "__call__", spy)
    pipeline.train(_config(folder, tmp_path / "with", dense_epochs=1, sparsify_epochs=1))
    assert len(calls) == 8  # one fine-tuning epoch: 120 images in batches of 16
    calls.clear()
    pipeline.train(_config(folder, tmp_path / "without", dense_epochs=1, sparsify_epochs=1, distill=False))
    assert not calls


def test_random_and_no_communication_baselines_share_the_path(folder, tmp_path):
    random_run = pipeline.train(_config(folder, tmp_path / "random", method="random", budget=0.1))
    assert 0.07 <= random_run["ratio"] <= 0.1
    silent = pipeline.train(_config(folder, tmp_path / "silent", budget=0.0))
    assert silent["ratio"] == 0.0 and silent["bytes_per_image"] == 0


def test_starting_from_dense_weights_skips_dense_training(folder, tmp_path):
    first = tmp_path / "first"
    pipeline.train(_config(folder, first, sparsify_epochs=1, finetune_epochs=1))
    second = tmp_path / "second"
    pipeline.train(_config(folder, second, dense_run=str(first), sparsify_epochs=1, finetune_epochs=1))
    assert [m["phase"] for m in _metrics(second)] == ["sparsify", "finetune"]
    training = json.loads((second / "report.json").read_text())["training"]
    assert training["dense_epochs"] is None and training["dense_weights"] == f"{first}/dense.safetensors"
    assert json.loads((second / "report.json").read_text())["dense_accuracy"] == pytest.approx(
        json.loads((first / "report.json").read_text())["dense_accuracy"])


@pytest.mark.parametrize("bad,needle", [
    (dict(budget=1.5), "budget"), (dict(budget=-0.2), "budget"), (dict(data="/nonexistent/data"), "not found"),
    (dict(method="magic"), "method"), (dict(nodes=0), "nodes"),
])
def test_bad_arguments_are_refused(folder, tmp_path, bad, needle):
    with pytest.raises(DiscoError, match=needle):
        _config(folder, tmp_path / "run", **bad)


def test_unknown_dataset_is_refused():
    with pytest.raises(DiscoError, match="unknown dataset"):
        load_dataset("imagenet-9000")


def test_folder_without_splits_is_refused(tmp_path):
    with pytest.raises(DiscoError, match="train"):
        load_dataset(data=tmp_path)


def test_existing_run_is_not_overwritten(folder, tmp_path):
    pipeline.train(_config(folder, tmp_path / "run"), stop_after_epochs=1)
    with pytest.raises(DiscoError, match="--resume"):
        pipeline.train(_config(folder, tmp_path / "run"))


def test_resuming_a_folder_that_is_not_a_run_is_refused(tmp_path):
    with pytest.raises(DiscoError, match="not a run folder"):
        pipeline.resume(tmp_path)


def test_resuming_a_checkpoint_of_the_old_format_is_refused(folder, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)  # one folder whose files were replaced one by one
    _config(folder, out).save(out / "config.json")
    with pytest.raises(DiscoError, match="old format"):
        pipeline.resume(out)


def test_resuming_before_the_first_checkpoint_starts_from_the_beginning(folder, tmp_path):
    out = tmp_path / "run"
    assert pipeline.train(_config(folder, out, dense_epochs=1, sparsify_epochs=1), stop_after_epochs=0)["stopped"]
    assert (out / "config.json").is_file() and not (out / checkpoint.CHECKPOINTS).exists()
    (out / "metrics.jsonl").write_text('{"phase": "dense", "epoch": 1, "train_lo')  # a line cut by a kill
    pipeline.resume(out)
    assert [(m["phase"], m["epoch"]) for m in _metrics(out)] == [("dense", 1), ("sparsify", 1), ("finetune", 1)]


def test_resuming_a_finished_run_trains_nothing(folder, tmp_path):
    out = tmp_path / "run"
    report = pipeline.train(_config(folder, out, dense_epochs=1, sparsify_epochs=1))
    metrics, weights = _metrics(out), (out / "disco.safetensors").read_bytes()
    assert pipeline.resume(out) == report
    assert _metrics(out) == metrics and (out / "disco.safetensors").read_bytes() == weights


def test_cli_train_reports_errors_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "disco", "train", "--model", tiny_model_spec(), "--budget", "2",
                             "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "budget" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Fashion-MNIST not installed (make test installs it "
                    "as root: apt-get install dataset-fashion-mnist)")
def test_cli_train_on_fashion_mnist_subset(tmp_path):
    out = tmp_path / "fm"
    result = subprocess.run([sys.executable, "-m", "disco", "train", "--model", tiny_model_spec(), "--nodes", "2",
                             "--budget", "0.2", "--epochs", "1", "--train-subset", "300", "--test-subset", "200",
                             "--min-phase-steps", "0",
                             "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"] == "fashion-mnist" and report["ratio"] <= 0.2


def test_small_data_is_repeated_until_each_sparse_phase_has_its_steps(folder, tmp_path):
    """120 images at batch 16 are 8 steps per epoch: with at least 20 steps a phase, 1 asked epoch becomes 3,
    and metrics.jsonl says what schedule ran and every cut (the sparsifier's own count of the ratio)."""
    out = tmp_path / "run"
    report = pipeline.train(_config(folder, out, dense_epochs=1, sparsify_epochs=1, finetune_epochs=1,
                                    min_phase_steps=20))
    metrics = _metrics(out)
    assert [m["phase"] for m in metrics] == ["dense"] + ["sparsify"] * 3 + ["finetune"] * 3
    sparsify = [m for m in metrics if m["phase"] == "sparsify"]
    assert sparsify[0]["schedule"] == {"phase": "sparsify", "epochs": 3, "asked_epochs": 1, "steps_per_epoch": 8,
                                       "steps": 24, "lr": 1e-2, "warmup_steps": 1}
    cuts = [cut for m in sparsify for cut in m["cuts"]]
    assert cuts and all(cut["step"] > 2 for cut in cuts)  # none before the first cut step (10% of 24)
    assert [cut["step"] for cut in cuts] == sorted({cut["step"] for cut in cuts})  # each logged once, in order
    assert cuts[-1]["target"] == 0.2 and cuts[-1]["ratio"] == pytest.approx(report["ratio"], abs=1e-6)
    assert report["training"]["sparsify_epochs"] == report["training"]["finetune_epochs"] == 3
    assert "24 + 24 steps; 1 + 1 epochs were asked: the data is small" in (out / "report.md").read_text()


def test_nested_budgets_give_one_model_for_each_budget_and_export_any(folder, tmp_path):
    """--nested 0.5,0.2 with --budget 0.1: the report scores each budget; nested.safetensors holds the nested
    order, whose masks at the run's budget are disco.safetensors'; `export --budget` writes a deployment whose
    bytes are that budget's (the manifest's own accounting)."""
    from disco.sparsify.nested import NESTED, load_levels
    from disco.training.export_run import export_run

    out = tmp_path / "run"
    report = pipeline.train(_config(folder, out, budget=0.1, nested=[0.2, 0.5], dense_epochs=1, sparsify_epochs=2))
    assert [n["budget"] for n in report["nested"]] == [0.5, 0.2, 0.1]
    assert all(n["ratio"] <= n["budget"] + 1e-9 for n in report["nested"])
    assert report["nested"][-1]["score"] == pytest.approx(report["disco_accuracy"])
    # each fine-tune epoch is scored with the run's own budget's statistics (not those mixed over every budget
    # by nested fine-tuning): on data of fewer than 20 batches, the same statistics as the final score's
    assert _metrics(out)[-1]["phase"] == "finetune"
    assert _metrics(out)[-1]["test_accuracy"] == pytest.approx(report["disco_accuracy"])
    budgets, levels, norms = load_levels(out / NESTED)
    masks = _masks(out / "disco.safetensors")
    assert budgets == (0.5, 0.2, 0.1)
    assert all(torch.equal(levels[key[:-len(".group_mask")]] > 2, masks[key] > 0) for key in masks)
    assert "nested budget 0.2:" in (out / "report.md").read_text()
    saved = safetensors.torch.load_file(str(out / "disco.safetensors"))
    assert len(norms) == 3 and set(norms[0]) == {"1.running_mean", "1.running_var", "4.running_mean", "4.running_var"}
    assert all(torch.equal(saved[name], value) for name, value in norms[-1].items())  # the run's own budget's
    manifest = export_run(out, tmp_path / "deploy-0.2", budget=0.2)
    assert manifest.expected["bytes"] == report["nested"][1]["bytes_per_image"]
    with pytest.raises(DiscoError, match="not one of them"):
        export_run(out, tmp_path / "deploy-0.3", budget=0.3)
    _one_deployment_serves_every_budget(out, tmp_path, report)


def _one_deployment_serves_every_budget(out, tmp_path, report):
    """`export --budgets all`: one deployment whose run at each budget gives what the deployment of that budget
    alone gives (`export --budget B`: its own masks and statistics, BatchNorm folded), with that budget's bytes,
    also when consecutive batches switch budget; its default is the run's own budget."""
    from disco.runtime.inprocess import run_in_process
    from disco.training.export_run import export_run

    manifest = export_run(out, tmp_path / "all", budgets=[])
    assert manifest.budgets().budgets == [0.5, 0.2, 0.1] and manifest.level_of(None) == 2
    code = tiny_model_spec().rpartition(":")[0]  # the model's file, as `disco run --model-code`
    test_images = TrainConfig.load(out / "config.json").load_data().test
    x = torch.stack([test_images[i][0] for i in range(3)])
    alone = {}
    for level, entry in enumerate(report["nested"]):
        single = tmp_path / f"alone-{entry['budget']}"
        export_run(out, single, budget=entry["budget"])
        alone[entry["budget"]], _ = run_in_process(single, x, model_code=code)
        outputs, sent = run_in_process(tmp_path / "all", x, budget=entry["budget"], model_code=code)
        torch.testing.assert_close(outputs, alone[entry["budget"]], atol=1e-4, rtol=1e-4)
        assert sum(map(sum, sent["activations"])) == entry["bytes_per_image"] * len(x)
        assert manifest.reference_at(level)["accuracy"] == pytest.approx(entry["score"])
    switched, _ = run_in_process(tmp_path / "all", x, batch_size=1, budgets=[0.1, 0.5, 0.2], model_code=code)
    for index, budget in enumerate([0.1, 0.5, 0.2]):
        torch.testing.assert_close(switched[index], alone[budget][index], atol=1e-4, rtol=1e-4)
    with pytest.raises(DiscoError, match="at least two"):
        export_run(out, tmp_path / "one", budgets=[0.2])


def test_nested_budgets_are_checked(folder, tmp_path):
    with pytest.raises(DiscoError, match="nested budgets"):
        _config(folder, tmp_path / "run", budget=0.2, nested=[0.1])
    with pytest.raises(DiscoError, match="--method learned"):
        _config(folder, tmp_path / "run", budget=0.2, nested=[0.5], method="random")


def test_a_nested_run_resumed_inside_fine_tuning_ends_as_one_never_stopped(folder, tmp_path):
    """The budget cycle (which budget the next fine-tune step trains) and the recorded levels survive a stop."""
    settings = dict(budget=0.1, nested=[0.3], dense_epochs=1, sparsify_epochs=1, finetune_epochs=2)
    whole, parted = tmp_path / "whole", tmp_path / "parted"
    pipeline.train(_config(folder, whole, **settings))
    assert pipeline.train(_config(folder, parted, **settings), stop_after_epochs=3)["stopped"]
    pipeline.resume(parted)
    assert _without_time(_metrics(parted)) == _without_time(_metrics(whole))
    for name in ("disco.safetensors", "nested.safetensors"):
        expected = safetensors.torch.load_file(str(whole / name))
        got = safetensors.torch.load_file(str(parted / name))
        assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items()), name


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_meets_the_budget_and_deploys_as_simulated(folder, tmp_path, precision):
    """--precision bf16/fp16 (autocast; fp16 with loss scaling): the loss falls, the budget is met, the forward
    pass really ran in that dtype (a forward hook sees it), and the exported deployment gives the fp32 simulation's
    outputs (weights and masks stay fp32)."""
    from disco.models import build_for_data
    from disco.runtime.inprocess import run_in_process
    from disco.split.partitioner import partition
    from disco.training.export_run import export_run
    from disco.training.loops import train_epoch

    seen = []
    original = train_epoch

    def spying(model, *args, **kwargs):
        handle = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).register_forward_hook(
            lambda module, args, output: seen.append(output.dtype))
        try:
            return original(model, *args, **kwargs)
        finally:
            handle.remove()

    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "train_epoch", spying)
        report = pipeline.train(_config(folder, out, precision=precision, dense_epochs=3))
    wanted = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert seen and set(seen) == {wanted}
    losses = [m["train_loss"] for m in _metrics(out) if m["phase"] == "dense"]
    assert losses[-1] < losses[0]
    assert report["ratio"] <= 0.2 + 1e-9
    export_run(out, tmp_path / "deploy")
    config = TrainConfig.load(out / "config.json")
    data = config.load_data()
    x = torch.stack([data.test[i][0] for i in range(4)])
    model = build_for_data(config.model, channels=data.channels, classes=data.classes)
    simulated = partition(model, nodes=2, example_inputs=x[:1]).eval()
    checkpoint.load_model_state(simulated, out / "disco.safetensors")
    deployed, _ = run_in_process(tmp_path / "deploy", x, model_code=tiny_model_spec().rpartition(":")[0])
    with torch.no_grad():
        torch.testing.assert_close(deployed, simulated(x), atol=1e-4, rtol=1e-4)


def test_an_fp16_run_resumed_ends_as_one_never_stopped(folder, tmp_path):
    """The loss scaler's state is part of each checkpoint: stopping and resuming changes nothing. (The scaler
    starts high enough here that its first steps overflow and lower it, so its state differs from a fresh one.)"""
    import functools

    settings = dict(precision="fp16", dense_epochs=2, sparsify_epochs=1, finetune_epochs=1)
    whole, parted = tmp_path / "whole", tmp_path / "parted"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0 ** 30))
        pipeline.train(_config(folder, whole, **settings))
        assert pipeline.train(_config(folder, parted, **settings), stop_after_epochs=1)["stopped"]
        pipeline.resume(parted)
    assert _without_time(_metrics(parted)) == _without_time(_metrics(whole))
    expected = safetensors.torch.load_file(str(whole / "disco.safetensors"))
    got = safetensors.torch.load_file(str(parted / "disco.safetensors"))
    assert all(torch.equal(got[k], v) for k, v in expected.items())


def test_data_workers_change_nothing_but_who_reads_the_data(folder, tmp_path):
    """--workers 2: the same metrics and weights as reading the data in the training process."""
    settings = dict(dense_epochs=1, sparsify_epochs=1, finetune_epochs=1)
    pipeline.train(_config(folder, tmp_path / "inline", **settings))
    pipeline.train(_config(folder, tmp_path / "workers", workers=2, **settings))
    assert _without_time(_metrics(tmp_path / "workers")) == _without_time(_metrics(tmp_path / "inline"))
    expected = safetensors.torch.load_file(str(tmp_path / "inline" / "disco.safetensors"))
    got = safetensors.torch.load_file(str(tmp_path / "workers" / "disco.safetensors"))
    assert all(torch.equal(got[k], v) for k, v in expected.items())
