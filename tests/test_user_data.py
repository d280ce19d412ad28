"""The user's own --data folder is checked before training: bad files named (or left out with --skip-bad-data),
mixed image sizes resized to the first training image's size."""
import json
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from disco.data.checks import BadFile, decode_image
from disco.tasks.data import load_task_data
from disco.errors import DiscoError
from disco.runtime.inputs import eval_batches
from disco.training.config import TrainConfig


def write_png(path, height=8, width=8, mode="RGB", value=90):
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": (3,), "L": ()}[mode]
    Image.fromarray(np.full((height, width, *channels), value, np.uint8), mode=mode).save(path)
    return path


def truncate(path):
    """Cut a PNG inside its pixel data (the IDAT chunk): its header reads, its pixels do not."""
    data = path.read_bytes()
    path.write_bytes(data[:data.index(b"IDAT") + 6])
    return path


def text_as_png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not an image")
    return path


def zero_bytes(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


BAD_FILES = {"truncated": (lambda path: truncate(write_png(path)), "image file is truncated"),
             "text": (text_as_png, "not an image file"),
             "empty": (zero_bytes, "is empty")}


def image_folder(root, per_class=2, size=(8, 8)):
    """An ImageFolder with classes a and b: `per_class` good PNGs per class in train/ and in val/."""
    for split in ("train", "val"):
        for label in ("a", "b"):
            for i in range(per_class):
                write_png(root / split / label / f"{i}.png", *size)
    return root


# --- bad files ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_file_is_named_before_any_training_step(tmp_path, kind):
    make, cause = BAD_FILES[kind]
    bad = make(image_folder(tmp_path / "data") / "train" / "b" / "x.png")
    config = TrainConfig(model="disco:vit_small", data=str(tmp_path / "data"), out=str(tmp_path / "run"))
    with pytest.raises(DiscoError) as raised:
        config.load_data()
    message = str(raised.value)
    assert message.startswith(f"{bad}: ") and cause in message and "pass --skip-bad-data" in message
    assert "\n" not in message


def test_decode_image_names_each_cause(tmp_path):
    good = decode_image(write_png(tmp_path / "good.png", 6, 10, mode="L"))
    assert (good.size, good.mode) == ((6, 10), "L")
    for kind, (make, cause) in BAD_FILES.items():
        with pytest.raises(BadFile, match=cause):
            decode_image(make(tmp_path / f"{kind}.png"))
    with pytest.raises(BadFile, match="cannot be read"):
        decode_image(tmp_path / "missing.png")


def test_skip_bad_data_leaves_out_exactly_the_bad_files(tmp_path, capsys):
    root = image_folder(tmp_path / "data")  # 4 good in train, 4 good in val
    bad = [make(root / split / "a" / f"{kind}.png")
           for (kind, (make, _)), split in zip(BAD_FILES.items(), ("train", "train", "val"))]
    spec = load_task_data("classification", data=root, skip_bad_data=True)
    assert (len(spec.train), len(spec.test), spec.classes) == (4, 4, 2)
    kept = {path for path, _ in spec.train.samples + spec.test.samples}
    assert not kept & {str(path) for path in bad}
    assert [spec.train[i][0].shape for i in range(len(spec.train))] == [(3, 8, 8)] * 4  # every kept one reads
    line, = capsys.readouterr().err.strip().splitlines()
    assert "left out 3 bad file(s)" in line and str(min(bad[:2])) in line  # the first in ImageFolder's order


def test_a_split_with_only_bad_files_is_an_error_even_when_skipping(tmp_path):
    root = image_folder(tmp_path / "data", per_class=1)
    for path in (root / "val").rglob("*.png"):
        truncate(path)
    with pytest.raises(DiscoError, match="no usable val sample left .*all 2 are bad"):
        load_task_data("classification", data=root, skip_bad_data=True)


def test_eval_uses_the_training_runs_choice(tmp_path):
    """`disco run --eval` reloads the data from the manifest's dataset dict, skip_bad_data included."""
    root = image_folder(tmp_path / "data")
    truncate(root / "val" / "b" / "0.png")
    dataset = {"dataset": None, "data": str(root), "image_size": None, "test_subset": None, "seed": 0}
    manifest = SimpleNamespace(task="classification", dataset={**dataset, "skip_bad_data": True},
                               input_shape=[3, 8, 8])
    assert sum(len(batch.images) for batch in eval_batches(manifest, 8, None)) == 3
    with pytest.raises(DiscoError, match="0.png"):  # an older manifest without the key: nothing skipped
        next(eval_batches(SimpleNamespace(task="classification", dataset=dataset, input_shape=[3, 8, 8]), 8, None))


def test_skip_bad_data_is_saved_with_the_run(tmp_path):
    config = TrainConfig(model="disco:vit_small", data=str(tmp_path), out=str(tmp_path), skip_bad_data=True)
    config.save(tmp_path / "config.json")
    assert TrainConfig.load(tmp_path / "config.json").skip_bad_data
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["skip_bad_data"]  # a run saved before the option existed
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert not TrainConfig.load(tmp_path / "config.json").skip_bad_data


# --- mixed sizes ----------------------------------------------------------------------------------------------------


def test_mixed_sizes_are_resized_to_the_first_training_image(tmp_path, capsys):
    root = image_folder(tmp_path / "data", size=(12, 16))
    write_png(root / "train" / "b" / "9.png", 20, 24)
    write_png(root / "val" / "a" / "9.png", 7, 5)
    spec = load_task_data("classification", data=root)
    assert spec.image_size == (12, 16)
    images, _ = next(iter(DataLoader(spec.train, batch_size=len(spec.train))))
    assert images.shape == (5, 3, 12, 16)
    assert {spec.test[i][0].shape for i in range(len(spec.test))} == {(3, 12, 16)}
    line, = capsys.readouterr().err.strip().splitlines()
    assert "train/a/0.png (16x12)" in line and "train/b/9.png (24x20)" in line and "--image-size N" in line


def test_image_size_resizes_every_image_silently(tmp_path, capsys):
    root = image_folder(tmp_path / "data", size=(12, 16))
    write_png(root / "train" / "b" / "9.png", 20, 24)
    spec = load_task_data("classification", data=root, image_size=10)
    assert spec.image_size == (10, 10) and spec.train[4][0].shape == (3, 10, 10)
    assert capsys.readouterr().err == ""


def test_one_size_is_not_resized(tmp_path, capsys):
    spec = load_task_data("classification", data=image_folder(tmp_path / "data", size=(12, 16)))
    assert "Resize" not in repr(spec.train.transform) and capsys.readouterr().err == ""


# --- annotated layouts and super-resolution --------------------------------------------------------------------------


def voc_folder(root, ids_by_split):
    """A VOC folder with an 8x8 image and a palette mask (classes 0 and 1) per id."""
    for split, ids in ids_by_split.items():
        (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for name in ids:
            write_png(root / "JPEGImages" / f"{name}.jpg")
            mask = np.zeros((8, 8), np.uint8)
            mask[2:6, 2:6] = 1
            (root / "SegmentationClass").mkdir(exist_ok=True)
            Image.fromarray(mask, mode="P").save(root / "SegmentationClass" / f"{name}.png")
    return root


BAD_MASKS = {"truncated": (truncate, r"cannot be decoded \(image file is truncated\)"),
             "rgb": (lambda path: write_png(path), "is a RGB image: segmentation masks must be palette"),
             "other size": (lambda path: write_png(path, 4, 6, mode="L"), "is 6x4 while its image t1.jpg is 8x8")}


@pytest.mark.parametrize("kind", BAD_MASKS)
def test_voc_bad_mask_is_a_bad_sample(tmp_path, capsys, kind):
    make, cause = BAD_MASKS[kind]
    root = voc_folder(tmp_path / "voc", {"train": ["t0", "t1", "t2"], "val": ["v0"]})
    mask = make(root / "SegmentationClass" / "t1.png")
    with pytest.raises(DiscoError, match=f"^{re.escape(str(mask))}: {cause}.*pass --skip-bad-data"):
        load_task_data("segmentation", data=root)
    spec = load_task_data("segmentation", data=root, skip_bad_data=True)
    assert (len(spec.train), len(spec.test), spec.classes) == (2, 1, 2)
    assert spec.train[1][1]["mask"].sum() == 16  # t2's own mask: images and masks stay paired
    assert "left out 1 bad file(s)" in capsys.readouterr().err


def test_coco_bad_image_is_left_out_with_its_boxes(tmp_path):
    root = tmp_path / "coco"
    for name in ("a", "b"):
        write_png(root / "train" / f"{name}.png", 16, 16)
    write_png(root / "val" / "c.png", 16, 16)
    zero_bytes(root / "train" / "a.png")
    categories = [{"id": 1, "name": "cat"}]
    images = {"train": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
              "val": [{"id": 3, "file_name": "c.png"}]}
    boxes = {1: [0, 0, 4, 4], 2: [2, 2, 6, 6], 3: [1, 1, 2, 2]}
    (root / "annotations").mkdir()
    for split, listed in images.items():
        annotations = [{"image_id": image["id"], "bbox": boxes[image["id"]], "category_id": 1} for image in listed]
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": listed, "annotations": annotations, "categories": categories}))
    with pytest.raises(DiscoError, match="a.png: is empty"):
        load_task_data("detection", data=root)
    spec = load_task_data("detection", data=root, skip_bad_data=True)
    assert len(spec.train) == 1 and torch.equal(spec.train[0][1]["boxes"], torch.tensor([[2.0, 2, 8, 8]]))


def test_superres_bad_file_is_left_out_before_the_split(tmp_path):
    for i in range(5):
        write_png(tmp_path / "photos" / f"{i}.png", 96, 96)
    text_as_png(tmp_path / "photos" / "2.png")
    with pytest.raises(DiscoError, match="2.png: is not an image file"):
        load_task_data("superres", data=tmp_path / "photos")
    spec = load_task_data("superres", data=tmp_path / "photos", skip_bad_data=True)
    assert (len(spec.train), len(spec.test)) == (3, 1)  # 4 usable files: 3 train, 1 test, one patch each


# --- command line ---------------------------------------------------------------------------------------------------


def test_train_refuses_a_bad_file_in_one_line(tmp_path):
    bad = truncate(write_png(image_folder(tmp_path / "data") / "val" / "a" / "broken.png"))
    result = subprocess.run([sys.executable, "-m", "disco.cli.main", "train", "--model", "disco:vit_small",
                             "--data", str(tmp_path / "data"), "--epochs", "0", "--budget", "1",
                             "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    line, = result.stderr.strip().splitlines()
    assert line.startswith(f"disco train: error: {bad}: cannot be decoded") and "--skip-bad-data" in line
    assert not (tmp_path / "run" / "checkpoint").exists()
