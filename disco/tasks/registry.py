"""The task registry: everything DISCO knows about a task, in one `Task` per task.

A task module (disco/tasks/classification.py, segmentation.py, detection.py, superres.py) defines its
objective, how node 0 describes an output, its data and its built-in models, and calls `register_task`
when imported; disco/tasks/__init__.py imports them all. Every other module reads the registry
(`get_task`, `task_names`): nothing else lists tasks. A new task is one module plus its import there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Callable, Mapping, Protocol

from disco.errors import DiscoError

if TYPE_CHECKING:  # annotations only: the task modules import this module, and disco.data imports none of them
    from torch import nn

    from disco.data.datasets import DataRequest, DataSpec
    from disco.tasks.objectives import Objective


class Describe(Protocol):
    def __call__(self, output, names: list[str] | None, *, detector: nn.Module | None = None,
                 image_size=None) -> list[dict]: ...


@dataclass(frozen=True)
class Task:
    """name: the --task value. objective: the Objective subclass (loss, distillation, metric, collate);
    build one with `task.objective(classes=..., model=..., image_size=...)`.
    describe(output, names, *, detector, image_size): one dict per image of a batch's output, each with a
    `text` line (what node 0 prints); names are the class names, detector decodes detection head maps.
    datasets: built-in dataset name -> loader(DataRequest) -> DataSpec; the first is the default.
    load_folder(path, DataRequest) -> DataSpec: the user's own data; folder_layout says what PATH holds.
    models: the `disco:NAME` models the task brings, name -> factory (see disco.models.build_for_data).
    """

    name: str
    objective: type[Objective]
    describe: Describe
    datasets: Mapping[str, Callable[[DataRequest], DataSpec]]
    load_folder: Callable[[Path, DataRequest], DataSpec]
    folder_layout: str
    models: Mapping[str, Callable[..., nn.Module]] = field(default_factory=dict)
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
