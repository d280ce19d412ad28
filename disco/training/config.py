"""All options of a training run, validated in one place (saved as config.json in the run folder)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from disco.data.datasets import DataSpec
from disco.data.tasks import load_task_data
from disco.errors import DiscoError
from disco.options import MAX_NODES
from disco.transport import TRANSPORT_DTYPES
from disco.sparsify.sparsifier import METHODS
from disco.tasks.predictions import TASKS

PHASES = ("dense", "sparsify", "finetune")


@dataclass(kw_only=True)
class TrainConfig:
    """model: model spec (torchvision:NAME or file.py:factory); model_kwargs: passed to it.
    task: classification, segmentation, detection or superres (loss, distillation and metric per task).
    dataset / data: a known dataset name, or an ImageFolder path (train/, val/) that takes precedence.
    nodes, budget (fraction of dense bytes, 0..1), method ("learned" or "random").
    dense_epochs / sparsify_epochs / finetune_epochs: epochs of each phase (dense is skipped when weights
    or dense_run is given). distill: fine-tune with distillation from the dense model.
    lr: AdamW learning rate of the dense phase; the sparsify and fine-tune phases use lr * sparse_lr_scale
    (measured on Fashion-MNIST/mobilenet_v2: 0.25 left the pruned model too little room to adapt, -4.8
    points at budget 0.1 on 2 nodes, so the default is 1).
    train_subset / test_subset: use only that many samples (quick runs)."""

    model: str
    out: str
    task: str = "classification"
    dataset: str | None = None  # None: the task's default (fashion-mnist; fashion-scenes for seg./detection)
    data: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    stem_stride: int | None = None
    nodes: int = 2
    budget: float = 0.2
    method: str = "learned"
    dense_epochs: int = 2
    sparsify_epochs: int = 2
    finetune_epochs: int = 2
    batch_size: int = 128
    lr: float = 2e-3
    sparse_lr_scale: float = 1.0
    weight_decay: float = 1e-4
    regularization: float = 1e-4
    distill: bool = True
    temperature: float = 4.0
    distill_weight: float = 0.7
    weights: str | None = None
    dense_run: str | None = None
    seed: int = 0
    train_subset: int | None = None
    test_subset: int | None = None
    transport_dtype: str = "fp32"
    image_size: int | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise DiscoError(f"unknown --task {self.task!r}; known: {', '.join(TASKS)}")
        if self.dataset is None and self.task == "classification":
            self.dataset = "fashion-mnist"
        if not 0.0 <= self.budget <= 1.0:
            raise DiscoError(f"--budget must be in [0, 1] (a fraction of the dense split's bytes), got {self.budget}")
        if not 1 <= self.nodes <= MAX_NODES:
            raise DiscoError(f"--nodes must be between 1 and {MAX_NODES}, got {self.nodes}")
        if self.method not in METHODS:
            raise DiscoError(f"unknown --method {self.method!r}; known: {', '.join(METHODS)}")
        for name in ("dense_epochs", "sparsify_epochs", "finetune_epochs"):
            if getattr(self, name) < 0:
                raise DiscoError(f"--{name.replace('_', '-')} must not be negative")
        if self.sparsify_epochs == 0 and self.budget < 1.0:
            raise DiscoError("a budget below 1 needs at least one --sparsify-epochs to reach it")
        if self.batch_size < 1 or self.lr <= 0 or self.sparse_lr_scale <= 0:
            raise DiscoError("--batch-size must be at least 1, --lr and --sparse-lr-scale positive")
        if self.transport_dtype not in TRANSPORT_DTYPES:
            raise DiscoError(f"unknown transport dtype {self.transport_dtype!r}")
        if self.data is not None and not Path(self.data).exists():
            raise DiscoError(f"--data path not found: {self.data}")
        for path in (self.weights, self.dense_run):
            if path is not None and not Path(path).exists():
                raise DiscoError(f"not found: {path}")

    def load_data(self) -> DataSpec:
        """The run's data, cut to train_subset / test_subset (the same samples in training, export and eval)."""
        return load_task_data(self.task, self.dataset, self.data, seed=self.seed, train_size=self.train_subset,
                              test_size=self.test_subset, image_size=self.image_size)

    def epochs(self, phase: str) -> int:
        return getattr(self, f"{phase}_epochs")

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> "TrainConfig":
        if not path.is_file():
            raise DiscoError(f"no run configuration at {path}")
        values = json.loads(path.read_text())
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})
