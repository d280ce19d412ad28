"""Data for every task as a DataSpec, so training, export and `disco run --eval` load it alike.

Which data a task has is the task's own (disco.tasks.registry.Task: its built-in datasets and how it reads
the user's folder); this module picks the source and cuts the run's subsets. Built-in data works offline.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from disco.data.datasets import DataRequest, DataSpec, subset
from disco.errors import DiscoError
from disco.tasks.registry import get_task


def load_task_data(task: str, dataset: str | None = None, data: str | Path | None = None, *, cache: Path | None = None,
                   seed: int = 0, train_size: int | None = None, test_size: int | None = None,
                   image_size: int | None = None, skip_bad_data: bool = False, recipe: str = "auto") -> DataSpec:
    """Train/test data of `task`: the built-in `dataset` (None: the task's default), or the user's folder `data`
    (which takes precedence). See each task's module in disco.tasks for its sources.

    train_size/test_size take a fixed random subset (drawn with `seed`) of each split; sources that generate
    their samples (the Fashion-MNIST scenes) make only that many. image_size: the side images are resized to
    (classification's ImageFolder) or the scenes' canvas side (default 96). Every file of a user's folder is
    decoded before this returns (disco.data.checks): a bad one is an error, or with skip_bad_data left out.
    recipe: how a user's photographs are read (disco.data.datasets.RECIPES).
    """
    chosen = get_task(task)
    request = DataRequest(cache=cache, seed=seed, train_size=train_size, test_size=test_size, image_size=image_size,
                          skip_bad_data=skip_bad_data, recipe=recipe)
    if data is not None:
        spec = chosen.load_folder(Path(data), request)
    else:
        dataset = dataset or chosen.default_dataset
        if dataset not in chosen.datasets:
            raise DiscoError(f"unknown {task} dataset {dataset!r}; known: {', '.join(chosen.datasets)} "
                             "(or give --data PATH)")
        spec = chosen.datasets[dataset](request)
    return replace(spec, train=subset(spec.train, train_size, seed), test=subset(spec.test, test_size, seed),
                   task=task)
