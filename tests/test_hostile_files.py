"""Files a user or an attacker hands over, and files we write where a user says: every JSON file is read bounded
and checked (one line, never a traceback or an endless read), nothing but a new or regular file is ever replaced,
and images are decoded at their own bit depth. References: the files' own bytes, a hand-made 8-bit twin of a
16-bit image, and the deployment's manifest as exported."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from disco.data.datasets import rgb_image
from disco.errors import DiscoError
from disco.export.manifest import MANIFEST_NAME, Manifest
from disco.files import check_output_file, write_text_atomically
from disco.jsonfile import MAX_DEPTH, parse_json, read_json
from disco.topology import Topology
from test_hostile_deployments import exported  # noqa: F401  (the module's exported tiny deployment)


@pytest.mark.parametrize("content, message", [
    (b"[1, 2, 3]", "must hold a JSON object, found a array"),
    (b"\xff\xfe not text", "not UTF-8"),
    (b"[" * 200_000 + b"]" * 200_000, "nests deeper"),
    (b'{"a": ' * (MAX_DEPTH + 1) + b"1" + b"}" * (MAX_DEPTH + 1), "nests deeper"),
    (b'{"a": NaN}', "NaN is not a number JSON allows"),
    (b'{"a": 1e999}', "too large a number"),
    (b'{"a": ', "not valid JSON"),
])
def test_a_hostile_json_file_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "file.json"
    path.write_bytes(content)
    with pytest.raises(DiscoError, match=message):
        read_json(path, what="test file", max_bytes=10 << 20)


def test_a_json_file_is_measured_before_it_is_read(tmp_path):
    path = tmp_path / "huge.json"
    with open(path, "wb") as stream:  # sparse: 8 GB that occupy no disk, and would take 8 GB of memory to read
        stream.truncate(8 << 30)
    with pytest.raises(DiscoError, match="at most"):
        read_json(path, what="manifest", max_bytes=1 << 20)
    os.mkfifo(tmp_path / "fifo.json")  # a FIFO would block the reader forever
    with pytest.raises(DiscoError, match="not a regular file"):
        read_json(tmp_path / "fifo.json", what="manifest", max_bytes=1 << 20)
    assert parse_json(b'{"a": [1, 2.5]}', what="x") == {"a": [1, 2.5]}


MANIFEST_EDITS = {
    "a list": lambda raw: [raw],
    "expected null": lambda raw: {**raw, "expected": None},
    "expected missing io bytes": lambda raw: {**raw, "expected": {k: v for k, v in raw["expected"].items()
                                                                  if k != "io_bytes"}},
    "nodes a string": lambda raw: {**raw, "nodes": "2"},
    "an unknown field": lambda raw: {**raw, "surprise": 1},
    "a class name with escapes": lambda raw: {**raw, "class_names": ["\x1b]0;PWNED\x07"] * 10},
}


@pytest.mark.parametrize("edit", list(MANIFEST_EDITS))
def test_a_malformed_manifest_is_refused_in_one_line(exported, tmp_path, edit):  # noqa: F811
    folder, _, _ = exported
    copy = tmp_path / "deploy"
    shutil.copytree(folder, copy)
    raw = json.loads((copy / MANIFEST_NAME).read_text())
    (copy / MANIFEST_NAME).write_text(json.dumps(MANIFEST_EDITS[edit](raw)))
    with pytest.raises(DiscoError):
        Manifest.load(copy)
    assert Manifest.load(folder).expected_at(0).bytes > 0  # the original still loads


def test_a_topology_out_of_bounds_is_refused(tmp_path):
    path = tmp_path / "topology.json"
    path.write_text('{"nodes": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(DiscoError, match="nests deeper"):
        Topology.load(path)


def test_only_new_or_regular_files_are_replaced(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "folder").mkdir()
    (tmp_path / "target").write_text("mine")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    for refused in ("fifo", "folder", "link", "missing/file"):
        with pytest.raises(DiscoError):
            write_text_atomically(tmp_path / refused, "new", "--summary")
    assert (tmp_path / "target").read_text() == "mine" and (tmp_path / "link").is_symlink()
    assert os.path.exists(tmp_path / "fifo") and not (tmp_path / "fifo").is_file()
    with pytest.raises(DiscoError, match="not a regular file"):
        check_output_file("/dev/null", "--save-output")  # a device: never replaced, even as root
    write_text_atomically(tmp_path / "target", "new")
    write_text_atomically(tmp_path / "fresh", "new")
    assert (tmp_path / "target").read_text() == (tmp_path / "fresh").read_text() == "new"


def test_a_sixteen_bit_greyscale_image_is_read_at_its_own_scale(tmp_path):
    levels = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(levels).save(tmp_path / "wide.png")  # a 16-bit greyscale PNG
    eight_bit = np.rint(levels / 257.0).astype(np.uint8)
    with Image.open(tmp_path / "wide.png") as image:
        assert image.mode.startswith("I")
        read = np.asarray(rgb_image(image))
    assert read.shape == (64, 64, 3)
    assert np.array_equal(read[..., 0], eight_bit)  # the same pixels as its 8-bit twin, none clipped to white
    assert (read == 255).mean() < 0.01
    twin = torch.from_numpy(np.asarray(rgb_image(Image.fromarray(eight_bit))).copy())
    assert torch.equal(torch.from_numpy(read.copy()), twin)


def test_a_link_too_slow_to_carry_anything_is_refused(tmp_path):
    path = tmp_path / "topology.json"
    path.write_text(json.dumps({"nodes": [{"gmac_per_s": 1}, {"gmac_per_s": 1}],
                                "mbit_per_s": [[None, 1e-320], [100, None]]}))
    with pytest.raises(DiscoError, match="mbit_per_s"):
        Topology.load(path)  # it would predict inf ms, blame the wrong node and write non-standard JSON


def test_a_shard_that_is_a_link_is_refused_before_it_is_opened(exported, tmp_path):  # noqa: F811
    from disco.export.manifest import verify_shard

    folder, _, _ = exported
    outside, copy = tmp_path / "outside", tmp_path / "deploy"
    outside.mkdir()
    shutil.copytree(folder, copy)
    manifest = Manifest.load(copy)
    shard = copy / manifest.shards[1]["file"]
    shutil.move(shard, outside / shard.name)
    shard.symlink_to(outside / shard.name)  # the identical bytes, outside the folder: still refused
    with pytest.raises(DiscoError, match="symbolic link"):
        verify_shard(manifest, copy, 1)
    assert verify_shard(manifest, copy, 0) == copy / manifest.shards[0]["file"]


def test_one_writer_per_run_folder(tmp_path):
    from disco.files import lock_folder
    from disco.training import pipeline
    from disco.training.config import TrainConfig
    from tests_helpers import tiny_model_spec

    out = tmp_path / "run"
    out.mkdir()
    TrainConfig(model=tiny_model_spec(), out=str(out), nodes=2, budget=0.2).save(out / "config.json")
    with lock_folder(out, "the run folder"):  # a resume in progress (another process, as far as flock knows)
        with pytest.raises(DiscoError, match="another process is writing"):
            pipeline.resume(out)
        assert sorted(p.name for p in out.iterdir()) == ["config.json"]  # nothing touched, nothing left
    with lock_folder(out, "the run folder"):  # released with its holder: the next writer gets it
        pass


def test_a_second_new_run_into_the_same_folder_is_refused(tmp_path):
    from disco.files import claim_folder
    from disco.training import pipeline
    from disco.training.config import TrainConfig
    from tests_helpers import tiny_model_spec

    out = tmp_path / "run"
    with claim_folder(out, "the run folder"):  # a first `disco train --out run` that has just begun
        with pytest.raises(DiscoError, match="another process is writing the run folder"):
            pipeline.train(TrainConfig(model=tiny_model_spec(), out=str(out), nodes=2, budget=0.2))
        assert list(out.iterdir()) == []  # the first run's folder untouched


@contextlib.contextmanager
def _tmpfs(path, options: str):
    """A file system of our own (read-only, or a few hundred KiB), mounted for the test and removed after it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only or tiny file system needs root")
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                             text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_a_read_only_out_is_one_clear_error_before_any_work(tmp_path):
    from disco.training import pipeline
    from disco.training.config import TrainConfig
    from tests_helpers import tiny_model_spec

    with _tmpfs(tmp_path / "ro", "ro,size=1m") as read_only:
        for out in (read_only, read_only / "run"):  # the folder itself, or a new one inside it
            with pytest.raises(DiscoError, match="cannot write the run folder .*Read-only file system"):
                pipeline.train(TrainConfig(model=tiny_model_spec(), out=str(out), nodes=2, budget=0.2))
            with pytest.raises(DiscoError, match="--summary .*(not writable|does not exist)"):
                write_text_atomically(out / "summary.json", "{}", "--summary")


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint_and_says_so(tmp_path):
    from disco.training.checkpoint import latest_checkpoint, save_checkpoint

    with _tmpfs(tmp_path / "small", "size=256k") as small:
        save_checkpoint(small, phase="dense", epoch=0, metrics_lines=1, model=torch.nn.Linear(4, 4),
                        training_state={"optimizer": {}})
        with pytest.raises(DiscoError, match=r"checkpoint of dense epoch 2 .*No space left on device.*--resume"):
            save_checkpoint(small, phase="dense", epoch=1, metrics_lines=2, model=torch.nn.Linear(512, 512),
                            training_state={"optimizer": {}})  # 1 MiB of weights
        assert [folder.name for folder in (small / "checkpoints").iterdir()] == ["0001"]  # no half folder
        assert latest_checkpoint(small).metrics_lines == 1


def _png_declaring(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height (its IHDR rewritten, checksum and all)."""
    import io
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    start = 8 + 8  # signature, then the IHDR chunk's length and type
    data[start:start + 8] = struct.pack(">II", width, height)
    data[start + 13:start + 17] = struct.pack(">I", zlib.crc32(bytes(data[start - 4:start + 13])))
    return bytes(data)


def test_an_image_declaring_more_pixels_than_allowed_is_413_before_decoding():
    from disco.serve.answers import read_image
    from disco.serve.batching import Refused

    for side in (20_000, 10_000):  # past PIL's own bomb limit, and past --max-pixels only
        with pytest.raises(Refused) as refused:
            read_image(_png_declaring(side, side), None, max_pixels=40_000_000)
        assert (refused.value.status, refused.value.kind) == (413, "too_many_pixels")


def test_an_export_replaces_a_deployment_whole_and_nothing_else(tmp_path, monkeypatch):
    import disco.export.shards as shards
    from test_hostile_deployments import _export_tiny

    folder = tmp_path / "deployments" / "deploy"  # its parent made as well
    _export_tiny(folder, seed=1)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    written = shards.node_tensors

    def killed(model, split, node, *args):  # the process dies after node 0's new shard, before node 1's
        if node == 1:
            raise KeyboardInterrupt
        return written(model, split, node, *args)

    monkeypatch.setattr(shards, "node_tensors", killed)
    with pytest.raises(KeyboardInterrupt):
        _export_tiny(folder, seed=2)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # the old deployment, whole
    assert sorted(p.name for p in folder.parent.iterdir()) == ["deploy"]  # and nothing left beside it
    monkeypatch.undo()
    _export_tiny(folder, seed=2)
    after = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert after.keys() == before.keys() and after != before  # the new deployment, whole
    (folder / "my-notes.txt").write_text("not ours")
    with pytest.raises(DiscoError, match="holds other files"):
        _export_tiny(folder, seed=3)
    assert (folder / "my-notes.txt").read_text() == "not ours"


def test_keys_and_deployments_are_not_written_over_a_file(tmp_path):
    from disco.export.signing import generate_keys
    from test_hostile_deployments import _export_tiny

    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(DiscoError, match="is a file"):
        generate_keys(tmp_path / "a-file")
    with pytest.raises(DiscoError, match="not a folder"):
        _export_tiny(tmp_path / "a-file")
    assert (tmp_path / "a-file").read_text() == "mine"


def test_an_integer_image_beyond_sixteen_bits_is_refused_not_clipped():
    deep = Image.fromarray(np.full((4, 4), 1 << 20, dtype=np.int32), mode="I")
    with pytest.raises(DiscoError, match="beyond 16 bits"):
        rgb_image(deep)
