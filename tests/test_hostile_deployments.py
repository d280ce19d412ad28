"""Deployments and inputs as an attacker (or an accident) would hand them over: code named by the manifest, shard
paths out of the folder, edited plans, swapped or foreign shards, forged hashes, bad signatures, hostile inputs.
Every one must be refused with one line before any rank runs it, and no code but disco's may be imported.

References: the simulation (a deployment that is accepted computes what it was exported for), and marker files
that a hostile model file would write if anything imported it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import disco
from disco.errors import DiscoError
from disco.export import ModelSpec, export
from disco.export.manifest import Manifest, sha256_of
from disco.export.signing import generate_keys, verify_deployment
from disco.runtime.inprocess import run_in_process
from disco.runtime.inputs import file_batches
from disco.runtime.program import load_program
from disco.split.masks import keep_random_groups
from disco.models import build_for_data
from runtime_helpers import disco_cli
from tests_helpers import tiny_model_file, tiny_model_spec

CPU = torch.device("cpu")
HOSTILE_MODEL = '''
from pathlib import Path
Path({marker!r}).write_text("imported")  # what an attacker's code would do: anything, on import
from torch import nn
def make_model(num_classes=10, in_channels=1):
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
'''


def _export_tiny(folder: Path, *, seed: int = 0, sign_key=None) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = build_for_data(tiny_model_spec(), channels=1, classes=10).eval()
    x = torch.randn(2, 1, 12, 12)
    simulated = disco.partition(model, nodes=2, example_inputs=x[:1]).eval()
    keep_random_groups(simulated, 0.4, seed=seed)
    export(simulated, folder, example_inputs=x[:1], spec=ModelSpec(model=tiny_model_spec(), channels=1, classes=10),
           sign_key=sign_key)
    return simulated, x


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("deploy")
    simulated, x = _export_tiny(folder)
    return folder, simulated, x


def _copy(exported, tmp_path) -> Path:
    return Path(shutil.copytree(exported[0], tmp_path / "copy"))


def _edit(folder: Path, change) -> None:
    path = folder / "manifest.json"
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


def _hostile_file(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "imported.txt"
    hostile = tmp_path / "tiny_model.py"  # the very name the manifest records
    hostile.write_text(HOSTILE_MODEL.format(marker=str(marker)))
    return hostile, marker


def _load_all(folder: Path, model_code=None) -> None:
    manifest = Manifest.load(folder)
    for rank in range(manifest.nodes):
        load_program(manifest, folder, rank, CPU, model_code)


# --- the model is data, never code ----------------------------------------------------------------------------
def test_an_accepted_deployment_records_the_model_file_by_name_and_hash_and_runs_with_it(exported):
    folder, simulated, x = exported
    manifest = Manifest.load(folder)
    assert manifest.model.model == "tiny_model.py:make_model"
    assert manifest.model.code_sha256 == sha256_of(Path(tiny_model_file()))
    output, _ = run_in_process(folder, x, model_code=tiny_model_file())
    with torch.no_grad():
        torch.testing.assert_close(output, simulated(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("named", ["{dir}/tiny_model.py:make_model", "../tiny_model.py:make_model",
                                   "sub/tiny_model.py:make_model", "tiny_model.txt:make_model"])
def test_a_manifest_naming_a_code_path_is_refused_before_anything_is_imported(exported, tmp_path, monkeypatch,
                                                                            named):
    folder = _copy(exported, tmp_path)
    hostile, marker = _hostile_file(tmp_path)
    shutil.copy(hostile, folder / hostile.name)  # even lying in the deployment folder or the working directory
    monkeypatch.chdir(tmp_path)
    _edit(folder, lambda raw: raw["model"].update(model=named.format(dir=tmp_path)))
    with pytest.raises(DiscoError, match="neither registered"):
        _load_all(folder, None)
    assert not marker.exists()


def test_a_model_file_is_used_only_when_the_runner_names_it_and_it_is_the_exported_one(exported, tmp_path,
                                                                                       monkeypatch):
    folder = _copy(exported, tmp_path)
    hostile, marker = _hostile_file(tmp_path)
    shutil.copy(hostile, folder / hostile.name)
    monkeypatch.chdir(folder)
    with pytest.raises(DiscoError, match="never runs code by itself.*--model-code"):
        _load_all(folder, None)
    with pytest.raises(DiscoError, match="not the model file this deployment was exported with"):
        _load_all(folder, hostile)
    # the attacker also rewrites the recorded hash: then the shards no longer match the manifest
    _edit(folder, lambda raw: raw["model"].update(code_sha256=sha256_of(hostile)))
    with pytest.raises(DiscoError, match="cut for another manifest"):
        _load_all(folder, hostile)
    assert not marker.exists()


def test_model_options_may_not_ask_for_downloaded_weights(exported, tmp_path):
    folder = _copy(exported, tmp_path)
    _edit(folder, lambda raw: raw["model"].update(kwargs={"weights": "DEFAULT"}))
    with pytest.raises(DiscoError, match="may not ask for weights"):
        Manifest.load(folder)


def test_a_registered_model_refuses_a_model_file(tmp_path):
    model = build_for_data("torchvision:resnet18", channels=3, classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    export(disco.partition(model, nodes=2, example_inputs=x), tmp_path, example_inputs=x,
           spec=ModelSpec(model="torchvision:resnet18", channels=3, classes=10))
    assert Manifest.load(tmp_path).model.code_sha256 is None
    with pytest.raises(DiscoError, match="registered model.*drop --model-code"):
        _load_all(tmp_path, tiny_model_file())


# --- shards: plain names in the folder, bound to the manifest and their node ----------------------------------
@pytest.mark.parametrize("name", ["../outside.safetensors", "{abs}", "sub/node1.safetensors", "..", ".safetensors",
                                  "node1.safetensors/", "node0.safetensors", 7, None, "bare string"])
def test_shard_names_other_than_plain_distinct_file_names_are_refused_before_any_file_is_opened(
        exported, tmp_path, monkeypatch, name):
    folder = _copy(exported, tmp_path)
    outside = tmp_path / "outside.safetensors"
    shutil.copy(folder / "node1.safetensors", outside)  # a real shard, with the right hash, outside the folder
    name = str(outside) if name == "{abs}" else name
    if name == "bare string":  # the whole entry replaced by a file name
        _edit(folder, lambda raw: raw["shards"].__setitem__(1, "node1.safetensors"))
    else:
        _edit(folder, lambda raw: raw["shards"][1].update(file=name))
    opened = []
    monkeypatch.setattr("disco.export.manifest.sha256_of", lambda path: opened.append(path))
    with pytest.raises(DiscoError, match="plain .safetensors file name|one shard file for several nodes|must be an entry"):
        _load_all(folder, tiny_model_file())
    assert opened == []


def _sender_swap(raw: dict) -> None:
    """Make node 0 send node 1 another of its channels than planned: a plan that still looks valid."""
    for plan in raw["layers"].values():
        sent, held = plan["sends"][0][1], [c for c, k in enumerate(plan["in_assign"]) if k == 0]
        others = [c for c in held if c not in sent]
        if sent and others and plan["conv_groups"] == 1:
            plan["sends"][0][1] = sorted([*sent[1:], others[0]])
            return
    raise AssertionError("no layer to edit")


EDITS = {
    "sends table": _sender_swap,
    "transport dtype": lambda raw: raw.update(transport_dtype="fp16"),
    "output assignment": lambda raw: next(iter(raw["layers"].values()))["out_assign"].reverse(),
    "class names": lambda raw: raw.update(class_names=[f"x{i}" for i in range(10)]),
    "model options": lambda raw: raw["model"].update(kwargs={"num_classes": 10}),
    "expected bytes": lambda raw: raw["expected"].update(bytes=1),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_any_edit_of_the_manifest_is_refused_before_the_ranks_join(exported, tmp_path, edit):
    folder = _copy(exported, tmp_path)
    _edit(folder, EDITS[edit])
    with pytest.raises(DiscoError, match="cut for another manifest|receives its channels|malformed|sends"):
        _load_all(folder, tiny_model_file())


def test_swapped_shards_are_refused(exported, tmp_path):
    folder = _copy(exported, tmp_path)
    first, second = folder / "node0.safetensors", folder / "node1.safetensors"
    first_bytes = first.read_bytes()
    first.write_bytes(second.read_bytes())
    second.write_bytes(first_bytes)
    with pytest.raises(DiscoError, match="the manifest says|does not match the manifest's sha256"):
        _load_all(folder, tiny_model_file())
    # the attacker swaps the manifest's entries too: the shards know their node
    _edit(folder, lambda raw: raw["shards"].reverse())
    _edit(folder, lambda raw: [s.update(file=f"node{n}.safetensors") for n, s in enumerate(raw["shards"])])
    with pytest.raises(DiscoError, match="holds the weights of node 1, not of node 0"):
        _load_all(folder, tiny_model_file())


def test_a_shard_of_another_export_is_refused_even_with_its_hash_written_in(exported, tmp_path):
    folder = _copy(exported, tmp_path)
    other = tmp_path / "other"
    _export_tiny(other, seed=5)  # same model, other channels kept
    shutil.copy(other / "node1.safetensors", folder / "node1.safetensors")
    _edit(folder, lambda raw: raw["shards"][1].update(_entry_of(folder / "node1.safetensors")))
    with pytest.raises(DiscoError, match="cut for another manifest"):
        _load_all(folder, tiny_model_file())


def test_a_file_that_is_not_a_shard_is_refused_without_revealing_it(exported, tmp_path):
    folder = _copy(exported, tmp_path)
    (folder / "node1.safetensors").write_text("secret text, not a shard")
    with pytest.raises(DiscoError) as refused:
        _load_all(folder, tiny_model_file())
    assert "secret" not in str(refused.value) and sha256_of(folder / "node1.safetensors")[:8] not in str(
        refused.value)
    _edit(folder, lambda raw: raw["shards"][1].update(_entry_of(folder / "node1.safetensors")))
    with pytest.raises(DiscoError, match="not a safetensors shard"):
        _load_all(folder, tiny_model_file())


def _entry_of(path: Path) -> dict:
    """What an attacker who can edit manifest.json writes for a file of their own."""
    return {"sha256": sha256_of(path), "bytes": path.stat().st_size}


def test_a_huge_file_in_place_of_a_shard_is_refused_before_it_is_read(exported, tmp_path):
    folder = _copy(exported, tmp_path)
    with open(folder / "node1.safetensors", "r+b") as shard:
        shard.truncate(1 << 40)  # sparse: hashing its terabyte of zeros would take hours
    with pytest.raises(DiscoError, match="has 1,099,511,627,776 bytes, the manifest says"):
        _load_all(folder, tiny_model_file())


# --- signatures -----------------------------------------------------------------------------------------------
def test_a_signed_deployment_verifies_and_any_change_or_other_key_is_refused(tmp_path):
    private, public = generate_keys(tmp_path / "keys")
    assert os.stat(private).st_mode & 0o077 == 0  # the private key is its owner's only
    with pytest.raises(DiscoError, match="never overwritten"):
        generate_keys(tmp_path / "keys")
    folder = tmp_path / "signed"
    _export_tiny(folder, sign_key=private)
    verify_deployment(folder, public)
    _, stranger = generate_keys(tmp_path / "stranger")
    with pytest.raises(DiscoError, match="does not verify"):
        verify_deployment(folder, stranger)
    with pytest.raises(DiscoError, match="not an unencrypted PEM public key"):
        verify_deployment(folder, folder / "manifest.json")
    manifest = folder / "manifest.json"
    manifest.write_text(manifest.read_text() + " ")  # even a harmless-looking change
    with pytest.raises(DiscoError, match="does not verify"):
        verify_deployment(folder, public)
    unsigned = tmp_path / "unsigned"
    _export_tiny(unsigned)
    with pytest.raises(DiscoError, match="is not signed"):
        verify_deployment(unsigned, public)


def test_disco_run_refuses_an_edited_signed_deployment_in_one_line_without_starting_ranks(tmp_path):
    private, public = generate_keys(tmp_path / "keys")
    folder = tmp_path / "signed"
    _, x = _export_tiny(folder, sign_key=private)
    safetensors.torch.save_file({"input": x}, str(tmp_path / "x.safetensors"))
    _edit(folder, lambda raw: raw.update(class_names=["evil"] * 10))
    result = disco_cli("run", str(folder), "--input", str(tmp_path / "x.safetensors"), "--verify-key", str(public),
                       "--model-code", tiny_model_file())
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "does not verify" in result.stderr
    assert "Traceback" not in result.stderr


# --- hostile inputs to node 0 ---------------------------------------------------------------------------------
def _hostile_inputs(folder: Path) -> dict[str, Path]:
    files = {}
    files["truncated tensor file"] = folder / "cut.safetensors"
    safetensors.torch.save_file({"input": torch.randn(2, 1, 12, 12)}, str(files["truncated tensor file"]))
    files["truncated tensor file"].write_bytes(files["truncated tensor file"].read_bytes()[:-40])
    files["text as tensor file"] = folder / "text.safetensors"
    files["text as tensor file"].write_text("not a tensor")
    files["header claiming huge tensor"] = folder / "huge.safetensors"
    header = json.dumps({"input": {"dtype": "F32", "shape": [1 << 40, 1, 12, 12], "data_offsets": [0, 4]}}).encode()
    files["header claiming huge tensor"].write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    files["wrong dtype"] = folder / "int.safetensors"
    safetensors.torch.save_file({"input": torch.zeros(1, 1, 12, 12, dtype=torch.int64)}, str(files["wrong dtype"]))
    files["NaN"] = folder / "nan.safetensors"
    safetensors.torch.save_file({"input": torch.full((1, 1, 12, 12), float("nan"))}, str(files["NaN"]))
    files["text as image"] = folder / "text.png"
    files["text as image"].write_text("not an image")
    files["FIFO as image"] = folder / "fifo.png"  # opened, it would block rank 0 until someone writes to it
    os.mkfifo(files["FIFO as image"])
    files["folder holding a FIFO"] = folder / "with_fifo"
    files["folder holding a FIFO"].mkdir()
    os.mkfifo(files["folder holding a FIFO"] / "camera.png")
    files["FIFO as tensor file"] = folder / "fifo.safetensors"
    os.mkfifo(files["FIFO as tensor file"])
    files["device"] = Path("/dev/zero")
    return files


CAUSES = {"truncated tensor file": "cannot read", "text as tensor file": "cannot read",
          "header claiming huge tensor": "cannot read", "wrong dtype": "dtype torch.int64 is not supported",
          "NaN": "NaN", "text as image": "cannot read image", "FIFO as image": "not a regular file",
          "folder holding a FIFO": "not a regular file", "FIFO as tensor file": "not a regular file",
          "device": "not a regular file"}


def test_hostile_inputs_are_refused_with_one_clear_error(exported, tmp_path):
    manifest = Manifest.load(exported[0])
    manifest.preprocess = {"channels": 1, "size": [12, 12], "mean": [0.5], "std": [0.5]}  # reads image files too
    for what, path in _hostile_inputs(tmp_path).items():
        with pytest.raises(DiscoError, match=CAUSES[what]) as refused:
            file_batches(path, manifest, 4)
        assert "\n" not in str(refused.value), what


def test_an_unexpected_exception_on_a_rank_is_one_line_naming_rank_and_cause(tmp_path):
    script = ("import disco.runtime.worker as w\n"
              "def boom(options): raise TypeError('a bug somewhere')\n"
              "w.run_rank = boom\n"
              f"w.main([{str(tmp_path)!r}, '--eval'] + EXTRA)\n")
    for extra, traceback_shown in (([], False), (["--verbose"], True)):
        result = subprocess.run([sys.executable, "-c", f"EXTRA = {extra!r}\n" + script], capture_output=True,
                                text=True, env=dict(os.environ, RANK="3"), timeout=120)
        assert result.returncode == 1
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("disco run: rank 3: error: TypeError: a bug somewhere")
        assert ("Traceback" in result.stderr) == traceback_shown
