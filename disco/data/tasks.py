"""Data for every task as a DataSpec: classification (disco.data.datasets) and the dense-prediction tasks
(segmentation, detection, super-resolution), so training, export and `disco run --eval` load it alike.

Built-in data works offline: Fashion-MNIST scenes for segmentation and detection, Fashion-MNIST or
scikit-image's photographs for super-resolution. `data=PATH` reads the user's own folder instead.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from disco.data.annotated import NORMALISATION, AnnotatedFolder, coco_detection, voc_segmentation
from disco.data.datasets import (FASHION_MNIST_MEAN, FASHION_MNIST_STD, DataSpec, fashion_mnist_splits, load_dataset,
                                 subset)
from disco.data.scenes import SceneOptions, fashion_scenes
from disco.data.superres import DownscaledPairs, SuperResOptions, image_files, photo_pairs, read_images, skimage_photos
from disco.errors import DiscoError

# Built-in datasets of each task; the first is the default.
TASK_DATASETS = {"segmentation": ("fashion-scenes",), "detection": ("fashion-scenes",),
                 "superres": ("fashion-mnist", "photos")}
USER_TRAIN_SHARE = 0.8  # a super-resolution folder: the first 80% of files (sorted by path) train, the rest test


def load_task_data(task: str, dataset: str | None = None, data: str | Path | None = None, *, cache: Path | None = None,
                   seed: int = 0, train_size: int | None = None, test_size: int | None = None,
                   image_size: int | None = None) -> DataSpec:
    """Train/test data of `task`: the built-in `dataset` (None: the task's default), or the user's folder `data`.

    - classification: disco.data.datasets.load_dataset ("fashion-mnist", or an ImageFolder at data=PATH,
      resized to image_size).
    - segmentation / detection, "fashion-scenes": FashionScenes (train scenes from the Fashion-MNIST train
      split, test scenes from the test split), 1 channel, 11 classes (0 = background). train_size/test_size
      are the numbers of scenes (default 10000 / 2000). data=PATH: a VOC folder (segmentation) or a COCO
      folder (detection), see disco.data.annotated.
    - superres, scale 2: "fashion-mnist" (28x28 -> 14x14; train pairs from the train split, test pairs from
      the test split), "photos" (96x96 patches of scikit-image's colour photographs: every other photo for
      training, the rest for testing, so no test patch comes from a training photo), or data=PATH (96x96
      patches of every PNG/JPEG under PATH: the first 80% of files by sorted path train, the rest test).
      classes = 0 and images stay in [0, 1] (mean 0, std 1).
    train_size/test_size otherwise take a fixed random subset (drawn with `seed`). image_size: the scenes'
    canvas side (default 96).
    """
    if task == "classification":
        spec = load_dataset(dataset or "fashion-mnist", data, cache=cache, image_size=image_size)
        return replace(spec, train=subset(spec.train, train_size, seed), test=subset(spec.test, test_size, seed))
    if task not in TASK_DATASETS:
        raise DiscoError(f"unknown task {task!r}; known: classification, {', '.join(TASK_DATASETS)}")
    if data is not None:
        return user_task_data(task, Path(data), seed, train_size, test_size)
    dataset = dataset or TASK_DATASETS[task][0]
    if dataset not in TASK_DATASETS[task]:
        raise DiscoError(f"unknown {task} dataset {dataset!r}; known: {', '.join(TASK_DATASETS[task])} "
                         "(or give --data PATH)")
    if task == "superres":
        return builtin_superres(dataset, cache, seed, train_size, test_size)
    return scenes_data(task, cache, seed, train_size, test_size, image_size)


def scenes_data(task: str, cache: Path | None, seed: int, train_size: int | None, test_size: int | None,
                canvas: int | None = None) -> DataSpec:
    options = SceneOptions(seed=seed) if canvas is None else SceneOptions(seed=seed, canvas=canvas)
    train, test, names = fashion_scenes(cache=cache, train_length=train_size, test_length=test_size,
                                        options=options)
    canvas = train.options.canvas
    return DataSpec("fashion-scenes", train, test, channels=1, classes=len(names) + 1, image_size=(canvas, canvas),
                    class_names=["background", *names], mean=[FASHION_MNIST_MEAN], std=[FASHION_MNIST_STD],
                    task=task)


def builtin_superres(dataset: str, cache: Path | None, seed: int, train_size: int | None,
                     test_size: int | None) -> DataSpec:
    options = SuperResOptions()
    if dataset == "fashion-mnist":
        train_split, test_split = fashion_mnist_splits(cache)
        train, test = (DownscaledPairs(split.data.unsqueeze(1), options.scale) for split in (train_split, test_split))
    else:
        photos = skimage_photos()
        train = photo_pairs(photos[::2], options, "scikit-image's training photos")
        test = photo_pairs(photos[1::2], options, "scikit-image's test photos")
    return superres_spec(dataset, train, test, seed, train_size, test_size)


def superres_spec(name: str, train: DownscaledPairs, test: DownscaledPairs, seed: int, train_size: int | None,
                  test_size: int | None) -> DataSpec:
    channels, height, width = train.images.shape[1:]
    return DataSpec(name, subset(train, train_size, seed), subset(test, test_size, seed), channels=channels,
                    classes=0, image_size=(height, width), class_names=[], mean=[0.0] * channels,
                    std=[1.0] * channels, task="superres")


def user_task_data(task: str, path: Path, seed: int, train_size: int | None, test_size: int | None) -> DataSpec:
    if task == "superres":
        return folder_superres(path, seed, train_size, test_size)
    folder: AnnotatedFolder = voc_segmentation(path) if task == "segmentation" else coco_detection(path)
    return DataSpec(path.name, subset(folder.train, train_size, seed), subset(folder.test, test_size, seed),
                    channels=folder.channels, classes=folder.classes, image_size=folder.image_size,
                    class_names=folder.class_names, mean=[NORMALISATION] * folder.channels,
                    std=[NORMALISATION] * folder.channels, task=task)


def folder_superres(path: Path, seed: int, train_size: int | None, test_size: int | None) -> DataSpec:
    files = image_files(path)
    if len(files) < 2:
        raise DiscoError(f"{path} has {len(files)} image: super-resolution needs at least 2 (train and test)")
    cut = min(len(files) - 1, max(1, int(len(files) * USER_TRAIN_SHARE)))
    images, options = read_images(files), SuperResOptions()  # read together: one channel count for both splits
    train = photo_pairs(images[:cut], options, f"{path} (training files)")
    test = photo_pairs(images[cut:], options, f"{path} (test files)")
    return superres_spec(path.name, train, test, seed, train_size, test_size)
