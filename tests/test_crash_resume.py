"""Crash-safe runs (issue 13): a run killed (SIGKILL) at any instant and resumed, maybe killed again, ends
with the metrics and weights of a run never interrupted; a run folder resumes wherever it was copied or moved.

The kills happen in processes of tests/crash_driver.py: at chosen calls of the file writes (inside a
checkpoint, around its rename, right after a metrics line, at both phase boundaries, among the final files)
and at random times.
"""
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from disco.training import pipeline
from disco.training.config import TrainConfig
from synthetic import make_image_folder
from tests_helpers import tiny_model_spec

DRIVER = Path(__file__).with_name("crash_driver.py")
# 120 images in batches of 16: 8 steps an epoch; checkpoints 0001-0002 dense, 0003-0004 sparsify, 0005 finetune
SETTINGS = dict(model=tiny_model_spec(), nodes=2, budget=0.2, dense_epochs=2, sparsify_epochs=2, finetune_epochs=1,
                batch_size=16, lr=1e-2, seed=0, min_phase_steps=0)


def _before(call, label, nth=1):
    return {"call": call, "label": label, "nth": nth, "when": "before"}


def _after(call, label, nth=1):
    return {"call": call, "label": label, "nth": nth, "when": "after"}


def _checkpoint_rename(name):
    return f"checkpoints/.tmp-{name} -> checkpoints/{name}"


# scenario -> its kills: the run is killed at the first, its resume at the next..., the last resume finishes
INSTANTS = {
    "right after the first metrics line, before its checkpoint": [_after("fsync", "metrics.jsonl")],
    "between the files of a checkpoint (mid-sparsify)": [_before("fsync", "checkpoints/.tmp-0004/state.pt")],
    "checkpoint written, not yet renamed": [_before("replace", _checkpoint_rename("0002"))],
    "checkpoint renamed, the older one not yet deleted": [_after("replace", _checkpoint_rename("0002"))],
    "dense -> sparsify: dense.safetensors written, not yet renamed": [
        _before("replace", ".dense.safetensors.tmp -> dense.safetensors")],
    "dense -> sparsify: dense.json not yet renamed": [_before("replace", ".dense.json.tmp -> dense.json")],
    "dense -> sparsify: inside the first sparse checkpoint, then its resume inside it too": [
        _before("fsync", "checkpoints/.tmp-0003/state.pt"), _before("replace", _checkpoint_rename("0003"))],
    "sparsify -> finetune: the last sparse checkpoint in place, masks not yet cut": [
        _after("rmtree", "checkpoints/0003")],
    "sparsify -> finetune: the first finetune checkpoint not yet renamed": [
        _before("replace", _checkpoint_rename("0005"))],
    "training done, disco.safetensors not yet renamed": [
        _before("replace", ".disco.safetensors.tmp -> disco.safetensors")],
    "report.json not yet renamed": [_before("replace", ".report.json.tmp -> report.json")],
}
RANDOM_KILLS = 3


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def killed_runs(images, tmp_path_factory):
    """Runs the driver once: the reference run, then every scenario. Returns (reference, trace, scenarios):
    scenarios as [(name, kills, folder, attempts)]."""
    root = tmp_path_factory.mktemp("crash")
    timers = random.Random(13)
    named = [*INSTANTS.items(), *((f"random time {k + 1}", [{"at_fraction": timers.uniform(0.1, 0.9)}])
                                   for k in range(RANDOM_KILLS))]
    plan = {"config": {**SETTINGS, "data": str(images)},
            "reference": {"out": str(root / "reference"), "trace": str(root / "trace.json")},
            "scenarios": [{"out": str(root / f"scenario-{k}"), "kills": kills} for k, (_, kills) in enumerate(named)]}
    (root / "plan.json").write_text(json.dumps(plan))
    done = subprocess.run([sys.executable, str(DRIVER), str(root / "plan.json"), str(root / "result.json")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads((root / "result.json").read_text())
    assert result["reference"]["outcome"] == "finished", done.stderr
    trace = [tuple(call) for call in json.loads((root / "trace.json").read_text())]
    scenarios = [(name, kills, root / f"scenario-{k}", attempts)
                 for k, ((name, kills), attempts) in enumerate(zip(named, result["scenarios"]))]
    return root / "reference", trace, scenarios, done.stderr


def _without_time(out):
    return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "train_seconds")}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def _files(out):
    return sorted(str(path.relative_to(out)) for path in out.rglob("*") if path.is_file())


def _assert_same_run(out, reference):
    """Same metrics (but time), weights, report and files (no leftovers) as the reference run."""
    assert _without_time(out) == _without_time(reference)
    for name in ("dense.safetensors", "disco.safetensors"):
        ours, theirs = (safetensors.torch.load_file(str(folder / name)) for folder in (out, reference))
        assert ours.keys() == theirs.keys(), name
        for key, value in theirs.items():
            assert torch.equal(ours[key], value), f"{name}: {key}"
    assert json.loads((out / "report.json").read_text()) == json.loads((reference / "report.json").read_text())
    assert _files(out) == _files(reference)


def test_every_chosen_instant_is_a_call_of_the_uninterrupted_run(killed_runs):
    _, trace, scenarios, _ = killed_runs
    chosen = [kill for _, kills, _, _ in scenarios for kill in kills if "call" in kill]
    for kill in chosen:  # a renamed file must fail here, not silently never kill
        assert trace.count((kill["call"], kill["label"])) >= kill["nth"], kill


def test_runs_killed_at_chosen_instants_resume_to_the_uninterrupted_run(killed_runs):
    reference, _, scenarios, log = killed_runs
    for name, kills, out, attempts in scenarios:
        if "random" in name:
            continue
        assert [a["outcome"] for a in attempts] == ["killed"] * len(kills) + ["finished"], (name, log)
        _assert_same_run(out, reference)


def test_runs_killed_at_random_times_resume_to_the_uninterrupted_run(killed_runs):
    reference, _, scenarios, log = killed_runs
    randomly = [(name, attempts, out) for name, _, out, attempts in scenarios if "random" in name]
    for name, attempts, out in randomly:
        assert attempts[-1]["outcome"] == "finished" and "failed" not in [a["outcome"] for a in attempts], (
            name, log)
        _assert_same_run(out, reference)
    # a timer can lose the race against a run on a loaded machine, not all of them
    assert sum(attempts[0]["outcome"] == "killed" for _, attempts, _ in randomly) >= RANDOM_KILLS - 1


@pytest.fixture(scope="module")
def one_thread():
    """The in-process runs below on one thread, like the driver's: several times faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def uninterrupted(images, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    pipeline.train(TrainConfig(**SETTINGS, data=str(images), out=str(out)))
    return out


def _snapshot(folder):
    return {path: (folder / path).read_bytes() for path in _files(folder)}


def test_a_copied_run_resumes_in_the_copy_and_leaves_the_original_alone(images, uninterrupted, tmp_path):
    original = tmp_path / "original"
    assert pipeline.train(TrainConfig(**SETTINGS, data=str(images), out=str(original)), stop_after_epochs=3)["stopped"]
    before = _snapshot(original)
    copied = tmp_path / "copied"
    shutil.copytree(original, copied)
    pipeline.resume(copied)
    assert _snapshot(original) == before
    _assert_same_run(copied, uninterrupted)
    assert json.loads((copied / "config.json").read_text())["out"] == str(copied)


def test_a_moved_run_resumes_from_the_command_line(images, uninterrupted, tmp_path):
    original = tmp_path / "original"
    pipeline.train(TrainConfig(**SETTINGS, data=str(images), out=str(original)), stop_after_epochs=3)
    moved = tmp_path / "moved"
    original.rename(moved)
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}  # the reference's thread count: the same sums
    done = subprocess.run([sys.executable, "-m", "disco", "train", "--resume", "--out", str(moved)],
                          capture_output=True, text=True, timeout=300, env=one_thread)
    assert done.returncode == 0, done.stderr
    assert not original.exists()
    _assert_same_run(moved, uninterrupted)
