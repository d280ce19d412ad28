"""The task registry: everything DISCO knows about a task, in one `Task` per task.

A task module (disco/tasks/classification.py, segmentation.py, detection.py, superres.py) defines its
objective, how node 0 describes an output, its data and its built-in models; disco/tasks/builtin.py
registers them, naming each implementation by where it lives (`Implementation`), so that listing tasks
(`disco train --help`, option validation) imports no torch. Every other module reads the registry
(`get_task`, `task_names`): nothing else lists tasks. A new task is one module plus its entry in builtin.py
(or a `register_task` call with plain functions and classes).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Callable, Mapping, Protocol

from disco.errors import DiscoError

if TYPE_CHECKING:  # annotations only: the task modules import this module, and disco.data imports none of them
    from torch import nn

    from disco.data.datasets import DataRequest, DataSpec
    from disco.tasks.objectives import Objective


class Implementation:
    """A task's class or function named by "module:attribute" and imported when first used: calling it calls
    the implementation, and its attributes are the implementation's (`task.objective.collate`)."""

    def __init__(self, path: str):
        module, _, attribute = path.partition(":")
        if not module or not attribute:
            raise DiscoError(f"an implementation is named 'package.module:attribute', got {path!r}")
        self._module, self._attribute = module, attribute

    def resolve(self):
        return getattr(importlib.import_module(self._module), self._attribute)

    def __call__(self, *args, **kwargs):
        return self.resolve()(*args, **kwargs)

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("_module", "_attribute"):  # copy/pickle probes: not delegated
            raise AttributeError(name)
        return getattr(self.resolve(), name)

    def __repr__(self) -> str:
        return f"Implementation('{self._module}:{self._attribute}')"


def resolved(implementation):
    """The class or function itself, whether registered directly or as an Implementation (for
    inspect.signature and isinstance, which a proxy would answer for itself)."""
    return implementation.resolve() if isinstance(implementation, Implementation) else implementation


class Describe(Protocol):
    def __call__(self, output, names: list[str] | None, *, detector: nn.Module | None = None,
                 image_size=None) -> list[dict]: ...


class Answer(Protocol):
    def __call__(self, output, names: list[str] | None, *, detector: nn.Module | None = None,
                 image_size=None, top_k: int = 5) -> list[dict]: ...


@dataclass(frozen=True)
class Task:
    """name: the --task value. objective: the Objective subclass (loss, distillation, metric, collate);
    build one with `task.objective(classes=..., model=..., image_size=...)`.
    describe(output, names, *, detector, image_size): one dict per image of a batch's output, each with a
    `text` line (what node 0 prints); names are the class names, detector decodes detection head maps.
    answer(output, names, *, detector, image_size, top_k): what `disco serve` returns per image: JSON values, and
    tensors under "mask" ([H, W] class indices) or "image" ([C, H, W] in 0..1), which it sends as PNG.
    datasets: built-in dataset name -> loader(DataRequest) -> DataSpec; the first is the default.
    load_folder(path, DataRequest) -> DataSpec: the user's own data; folder_layout says what PATH holds.
    models: the `disco:NAME` models the task brings, name -> factory (see disco.models.build_for_data).
    """

    name: str
    objective: type[Objective] | Implementation
    describe: Describe | Implementation
    datasets: Mapping[str, Callable[[DataRequest], DataSpec] | Implementation]
    load_folder: Callable[[Path, DataRequest], DataSpec] | Implementation
    folder_layout: str
    answer: Answer | Implementation | None = None  # None: describe's dicts
    models: Mapping[str, Callable[..., nn.Module] | Implementation] = field(default_factory=dict)
    # describe and the metric decode outputs with the model's weight-free parts (detection: anchors, box
    # decoding, NMS), so node 0 of a deployment rebuilds the model for them
    decodes_with_model: bool = False

    def __post_init__(self) -> None:
        if not self.datasets:
            raise DiscoError(f"task {self.name!r} needs at least one built-in dataset (its default)")
        # read-only views: a registered task cannot change under the modules that read it
        object.__setattr__(self, "datasets", MappingProxyType(dict(self.datasets)))
        object.__setattr__(self, "models", MappingProxyType(dict(self.models)))

    @property
    def default_dataset(self) -> str:
        return next(iter(self.datasets))

    @property
    def metric_name(self) -> str:
        """accuracy, miou, map, psnr...: the key of the test score in metrics and reports."""
        return self.objective.metric_name


_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add `task`; its name and its model names must be new (a `disco:NAME` model belongs to one task)."""
    if task.name in _TASKS:
        raise DiscoError(f"task {task.name!r} is already registered")
    taken = {model: other.name for other in _TASKS.values() for model in other.models}
    clash = [model for model in task.models if model in taken]
    if clash:
        raise DiscoError(f"task {task.name!r}: model disco:{clash[0]} is already brought by task {taken[clash[0]]!r}")
    _TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in _TASKS:
        raise DiscoError(f"unknown task {name!r}; known: {', '.join(task_names())}")
    return _TASKS[name]


def task_names() -> tuple[str, ...]:
    """In registration order (classification first: the default)."""
    return tuple(_TASKS)


def class_label(names: list[str] | None, index: int) -> str:
    """The name of class `index` for describe functions, or the index itself when there is no name."""
    return names[index] if names and index < len(names) else str(index)
