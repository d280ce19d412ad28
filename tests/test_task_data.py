"""Dense-prediction data: Fashion-MNIST scenes, super-resolution pairs, user VOC/COCO/image folders."""
import gzip
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from disco.data.datasets import DEBIAN_FASHION_MNIST, FASHION_MNIST_MEAN, FASHION_MNIST_STD
from disco.data.scenes import FashionScenes, SceneOptions, collate_scenes, detection_targets
from disco.data.superres import DownscaledPairs, bicubic_upscale, psnr
from disco.tasks.data import load_task_data
from disco.errors import DiscoError

needs_fashion_mnist = pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Fashion-MNIST not installed "
                                         "(as root: apt-get install dataset-fashion-mnist)")


def read_idx(name: str, header: int) -> np.ndarray:
    """Debian's gzipped IDX file read with numpy alone: a reference independent of torchvision."""
    with gzip.open(DEBIAN_FASHION_MNIST / f"{name}.gz", "rb") as file:
        return np.frombuffer(file.read(), dtype=np.uint8, offset=header)


@pytest.fixture(scope="module")
def fashion_test_split():
    """(images uint8 [10000, 28, 28], labels [10000]) of the Fashion-MNIST test split."""
    images = read_idx("t10k-images-idx3-ubyte", header=16).reshape(-1, 28, 28)
    return torch.from_numpy(images.copy()), torch.from_numpy(read_idx("t10k-labels-idx1-ubyte", header=8).copy())


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def scenes(fashion_test_split):
    images, labels = fashion_test_split
    return FashionScenes(images[:300], labels[:300], length=40, options=SceneOptions(seed=5))


def as_uint8(image: torch.Tensor) -> torch.Tensor:
    """Undo the scenes' normalisation: [1, H, W] float -> [H, W] uint8."""
    return torch.round((image[0] * FASHION_MNIST_STD + FASHION_MNIST_MEAN) * 255).to(torch.uint8)


def tight_crop(item: torch.Tensor) -> torch.Tensor:
    rows, cols = torch.nonzero(item > 25, as_tuple=True)
    return item[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


# --- Fashion-MNIST scenes -----------------------------------------------------------------------------------------


@needs_fashion_mnist
def test_scenes_are_deterministic_per_index_and_seed(scenes, fashion_test_split):
    images, labels = fashion_test_split
    again = FashionScenes(images[:300], labels[:300], length=40, options=SceneOptions(seed=5))
    other_seed = FashionScenes(images[:300], labels[:300], length=40, options=SceneOptions(seed=6))
    for index in (0, 7, 39):
        (first, target), (second, target_again) = scenes[index], again[index]
        assert torch.equal(first, second) and torch.equal(scenes[index][0], first)
        assert all(torch.equal(target[key], target_again[key]) for key in ("mask", "boxes", "labels"))
    assert any(not torch.equal(scenes[i][0], other_seed[i][0]) for i in range(5))
    assert not torch.equal(scenes[0][0], scenes[1][0])


@needs_fashion_mnist
def test_scene_masks_agree_with_boxes_and_labels(scenes):
    for index in range(len(scenes)):
        image, target = scenes[index]
        mask, boxes, labels = target["mask"], target["boxes"], target["labels"]
        assert image.shape == (1, 96, 96) and mask.shape == (96, 96) and mask.dtype == torch.long
        assert boxes.dtype == torch.float and labels.dtype == torch.long and len(boxes) == len(labels)
        assert 2 <= len(labels) <= 4 and labels.min() >= 1 and labels.max() <= 10
        inside_any_box = torch.zeros_like(mask, dtype=torch.bool)
        for (x1, y1, x2, y2), label in zip(boxes.long().tolist(), labels.tolist()):
            region = mask[y1:y2, x1:x2]
            assert set(region.unique().tolist()) <= {0, label}
            # Tight: every edge row and column of the box holds some of the item's pixels.
            assert (region[0] == label).any() and (region[-1] == label).any()
            assert (region[:, 0] == label).any() and (region[:, -1] == label).any()
            inside_any_box[y1:y2, x1:x2] = True
        assert (mask[~inside_any_box] == 0).all()
        assert (as_uint8(image)[~inside_any_box] <= 25).all()  # outside the boxes only faint item edges


@needs_fashion_mnist
def test_scene_boxes_never_overlap(scenes):
    for index in range(len(scenes)):
        boxes = scenes[index][1]["boxes"]
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                width = torch.minimum(boxes[i, 2], boxes[j, 2]) - torch.maximum(boxes[i, 0], boxes[j, 0])
                height = torch.minimum(boxes[i, 3], boxes[j, 3]) - torch.maximum(boxes[i, 1], boxes[j, 1])
                assert width <= 0 or height <= 0


@needs_fashion_mnist
def test_scene_pixels_are_the_source_items_at_their_boxes(scenes, fashion_test_split):
    images, labels = fashion_test_split
    crops = [(tight_crop(images[i]), int(labels[i]) + 1) for i in range(300)]
    for index in range(10):
        image, target = scenes[index]
        canvas = as_uint8(image)
        for (x1, y1, x2, y2), label in zip(target["boxes"].long().tolist(), target["labels"].tolist()):
            crop = canvas[y1:y2, x1:x2]
            assert any(c.shape == crop.shape and torch.equal(c, crop) and lab == label for c, lab in crops)
            assert torch.equal(target["mask"][y1:y2, x1:x2], (crop > 25).long() * label)


@needs_fashion_mnist
def test_full_canvas_places_fewer_items(fashion_test_split):
    images, labels = fashion_test_split
    tight = FashionScenes(images[:50], labels[:50], length=5, options=SceneOptions(canvas=28, min_items=3,
                                                                                   max_items=3))
    assert all(len(tight[i][1]["labels"]) == 1 for i in range(5))


def test_scene_options_are_validated():
    with pytest.raises(DiscoError, match="min_items"):
        SceneOptions(min_items=3, max_items=2)
    with pytest.raises(DiscoError, match="canvas"):
        SceneOptions(canvas=20)
    with pytest.raises(DiscoError, match="seed"):
        SceneOptions(seed=-1)


@needs_fashion_mnist
def test_collate_stacks_images_and_masks_and_keeps_box_lists(scenes):
    images, targets = next(iter(DataLoader(scenes, batch_size=3, collate_fn=collate_scenes)))
    assert images.shape == (3, 1, 96, 96) and targets["mask"].shape == (3, 96, 96)
    assert len(targets["boxes"]) == len(targets["labels"]) == 3
    for i, per_image in enumerate(detection_targets(targets)):
        assert set(per_image) == {"boxes", "labels"}
        assert torch.equal(per_image["boxes"], scenes[i][1]["boxes"])
        assert torch.equal(targets["mask"][i], scenes[i][1]["mask"])


@needs_fashion_mnist
@pytest.mark.parametrize("task, sizes, lengths", [("segmentation", (20, 10), (20, 10)),
                                                  ("detection", (None, None), (10000, 2000))])
def test_scene_task_data_uses_train_and_test_splits(task, sizes, lengths, cache, fashion_test_split):
    spec = load_task_data(task, cache=cache, train_size=sizes[0], test_size=sizes[1])
    assert (spec.task, spec.name, spec.channels, spec.classes, spec.image_size) == \
        (task, "fashion-scenes", 1, 11, (96, 96))
    assert spec.class_names[:2] == ["background", "T-shirt/top"] and len(spec.class_names) == 11
    assert (len(spec.train), len(spec.test)) == lengths
    assert torch.equal(spec.test.images, fashion_test_split[0]) and len(spec.train.images) == 60000
    assert spec.train.options.seed != spec.test.options.seed  # test layouts never repeat training layouts


# --- super-resolution ---------------------------------------------------------------------------------------------


@needs_fashion_mnist
def test_fashion_pairs_are_independent_bicubic_downscales(cache):
    spec = load_task_data("superres", cache=cache, train_size=50, test_size=8)
    assert (spec.task, spec.channels, spec.classes, spec.image_size, spec.mean, spec.std) == \
        ("superres", 1, 0, (28, 28), [0.0], [1.0])
    for index in range(8):
        lr, hr = spec.test[index]
        assert lr.shape == (1, 14, 14) and hr.shape == (1, 28, 28) and 0 <= hr.min() and hr.max() <= 1
        # PIL's float bicubic resize is antialiased with the same kernel (a = -0.5): an independent reference.
        reference = Image.fromarray(hr[0].numpy(), mode="F").resize((14, 14), Image.BICUBIC)
        assert np.allclose(lr[0].numpy(), np.clip(np.asarray(reference), 0, 1), atol=1e-4)


@needs_fashion_mnist
def test_bicubic_baseline_psnr_is_finite_and_below_near_perfect(cache):
    spec = load_task_data("superres", cache=cache, test_size=64)
    lr, hr = (torch.stack(part) for part in zip(*(spec.test[i] for i in range(64))))
    baseline = psnr(bicubic_upscale(lr, 2), hr)
    noisy = psnr((hr + 1e-3 * torch.randn_like(hr)).clamp(0, 1), hr)
    assert torch.isfinite(baseline) and 10 < baseline < noisy
    manual = (10 * torch.log10(1 / ((bicubic_upscale(lr, 2) - hr) ** 2).mean(dim=(1, 2, 3)))).mean()
    assert torch.allclose(baseline, manual, atol=1e-3)  # the mean of per-image PSNRs


def test_downscaled_pairs_reject_sizes_not_divisible_by_the_scale():
    with pytest.raises(DiscoError, match="not divisible by scale 2"):
        DownscaledPairs(torch.rand(2, 1, 27, 28), scale=2)
    with pytest.raises(DiscoError, match=r"\[0, 1\]"):
        DownscaledPairs(torch.rand(2, 1, 28, 28) * 255, scale=2)


def test_photos_give_colour_patches_from_separate_photos():
    import skimage.data

    spec = load_task_data("superres", "photos")
    assert (spec.channels, spec.image_size, spec.name) == (3, (96, 96), "photos")
    lr, hr = spec.train[0]
    assert lr.shape == (3, 48, 48) and hr.shape == (3, 96, 96)
    astronaut = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1).float() / 255
    assert torch.equal(hr, astronaut[:, :96, :96])  # the first training photo's top-left patch
    assert len(spec.train) > 100 and len(spec.test) > 20
    assert not any(torch.equal(spec.test[i][1], hr) for i in range(len(spec.test)))


# --- user folders ---------------------------------------------------------------------------------------------------


def write_voc(root, sizes_by_split):
    """A tiny VOC folder: each mask has classes 1 and 2 in blocks and a 255 border; returns the masks written."""
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    masks = {}
    for split, sizes in sizes_by_split.items():
        ids = [f"{split}_{i}" for i in range(len(sizes))]
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for name, (height, width) in zip(ids, sizes):
            mask = np.zeros((height, width), dtype=np.uint8)
            mask[2:8, 2:10], mask[10:16, 4:12], mask[8, :] = 1, 2, 255
            palette = Image.fromarray(mask, mode="P")
            palette.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [224] * 759)
            palette.save(root / "SegmentationClass" / f"{name}.png")
            Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
            masks[name] = mask
    return masks


def test_voc_folder_loads_masks_and_resizes_to_the_first_image(tmp_path):
    masks = write_voc(tmp_path / "voc", {"train": [(20, 24), (20, 24)], "val": [(20, 24), (40, 48)]})
    spec = load_task_data("segmentation", data=tmp_path / "voc")
    assert (spec.task, spec.channels, spec.classes, spec.image_size) == ("segmentation", 3, 3, (20, 24))
    assert spec.class_names == ["background", "class_1", "class_2"] and len(spec.train) == 2
    image, target = spec.train[1]
    assert image.shape == (3, 20, 24) and torch.equal(target["mask"], torch.from_numpy(masks["train_1"]).long())
    _, resized = spec.test[1]  # 40x48 -> 20x24, nearest neighbour at output pixel centres: the odd pixels
    assert torch.equal(resized["mask"], torch.from_numpy(masks["val_1"][1::2, 1::2]).long())
    images, targets = collate_scenes([spec.train[0], spec.test[1]])
    assert images.shape == (2, 3, 20, 24) and targets["mask"].shape == (2, 20, 24)


def test_voc_folder_missing_parts_are_named(tmp_path):
    write_voc(tmp_path / "voc", {"train": [(20, 24)], "val": [(20, 24)]})
    (tmp_path / "voc" / "SegmentationClass" / "val_0.png").unlink()
    with pytest.raises(DiscoError, match="SegmentationClass/val_0.png not found"):
        load_task_data("segmentation", data=tmp_path / "voc")
    with pytest.raises(DiscoError, match="nowhere not found.*JPEGImages"):
        load_task_data("segmentation", data=tmp_path / "nowhere")


def write_coco(root):
    """A tiny COCO folder: categories 7 ("cat") and 3 ("dog"); one crowd box; val's image twice the size."""
    for split, size in (("train", (32, 40)), ("val", (64, 80))):
        (root / split).mkdir(parents=True)
        Image.fromarray(np.zeros((*size, 3), np.uint8)).save(root / split / "a.png")
        Image.fromarray(np.zeros((*size, 3), np.uint8)).save(root / split / "b.png")
    (root / "annotations").mkdir()
    categories = [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}]
    train = {"images": [{"id": 2, "file_name": "b.png"}, {"id": 1, "file_name": "a.png"}], "categories": categories,
             "annotations": [{"image_id": 1, "bbox": [2, 3, 10, 5], "category_id": 7},
                             {"image_id": 1, "bbox": [20, 10, 4, 4], "category_id": 3},
                             {"image_id": 1, "bbox": [0, 0, 30, 30], "category_id": 3, "iscrowd": 1}]}
    val = {"images": [{"id": 5, "file_name": "a.png"}], "categories": categories,
           "annotations": [{"image_id": 5, "bbox": [8, 4, 20, 10], "category_id": 3}]}
    (root / "annotations" / "instances_train.json").write_text(json.dumps(train))
    (root / "annotations" / "instances_val.json").write_text(json.dumps(val))


def test_coco_folder_gives_xyxy_boxes_and_remapped_labels(tmp_path):
    write_coco(tmp_path / "coco")
    spec = load_task_data("detection", data=tmp_path / "coco")
    assert (spec.task, spec.channels, spec.classes, spec.image_size) == ("detection", 3, 3, (32, 40))
    assert spec.class_names == ["background", "dog", "cat"]  # category ids 3, 7 -> labels 1, 2
    image, target = spec.train[0]  # image id 1 comes first; its crowd box is skipped
    assert image.shape == (3, 32, 40)
    assert torch.equal(target["boxes"], torch.tensor([[2.0, 3, 12, 8], [20, 10, 24, 14]]))
    assert torch.equal(target["labels"], torch.tensor([2, 1]))
    assert spec.train[1][1]["boxes"].shape == (0, 4)
    _, val_target = spec.test[0]  # 64x80 image resized to 32x40: boxes halve
    assert torch.equal(val_target["boxes"], torch.tensor([[4.0, 2, 14, 7]])) and val_target["labels"].tolist() == [1]


def test_coco_folder_missing_annotations_are_named(tmp_path):
    write_coco(tmp_path / "coco")
    (tmp_path / "coco" / "annotations" / "instances_val.json").unlink()
    with pytest.raises(DiscoError, match="instances_val.json not found: expected the val annotations"):
        load_task_data("detection", data=tmp_path / "coco")


def test_image_folder_gives_patch_pairs_split_by_file_name(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (96, 200), dtype=np.uint8) for _ in range(5)]
    for i, array in enumerate(arrays):
        (tmp_path / "photos" / f"group{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(tmp_path / "photos" / f"group{i % 2}" / f"{i}.png")
    spec = load_task_data("superres", data=tmp_path / "photos")
    assert (spec.channels, spec.image_size, spec.classes) == (1, (96, 96), 0)
    assert (len(spec.train), len(spec.test)) == (8, 2)  # 4 training files, 1 test file, 2 patches each
    # Sorted by path: group0/0, group0/2, group0/4, group1/1 train; group1/3 tests.
    lr, hr = spec.test[1]
    assert lr.shape == (1, 48, 48) and torch.equal(hr[0], torch.from_numpy(arrays[3][:, 96:192]).float() / 255)


def test_image_folder_errors_say_what_is_expected(tmp_path):
    with pytest.raises(DiscoError, match="not a folder"):
        load_task_data("superres", data=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiscoError, match="no PNG/JPEG images"):
        load_task_data("superres", data=tmp_path / "empty")
    for i in range(2):
        Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "empty" / f"{i}.png")
    with pytest.raises(DiscoError, match="no 96x96 patch fits"):
        load_task_data("superres", data=tmp_path / "empty")


def test_unknown_task_or_dataset_lists_the_known_ones():
    with pytest.raises(DiscoError, match="known: classification, segmentation, detection, superres"):
        load_task_data("depth")
    with pytest.raises(DiscoError, match="known: fashion-mnist, photos"):
        load_task_data("superres", "imagenet")
