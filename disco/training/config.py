"""All options of a training run, validated in one place (saved as config.json in the run folder)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from disco.model_specs import MODEL_SPECS
from disco.fields import option
from disco.data.scene_options import SceneOptions
from disco.errors import DiscoError
from disco.jsonfile import SMALL_JSON_BYTES, read_json
from disco.options import MAX_NODES, check_weights, parse_weights
from disco.sparsify.budgets import check_nested, link_fractions, parse_link_budgets
from disco.data.recipes import RECIPES
from disco.sparsify.methods import METHODS

PRECISIONS = ("fp32", "bf16", "fp16")  # disco/training/precision.py
from disco.tasks.registry import get_task, task_names
from disco.transport import TRANSPORT_DTYPES

if TYPE_CHECKING:  # the data modules import torch: `disco train --help` must not wait for it
    from disco.data.datasets import DataSpec

PHASES = ("dense", "sparsify", "finetune")


def _task_help() -> str:
    listed = []
    for name in task_names():
        task = get_task(name)
        models = ", ".join(f"disco:{model}" for model in task.models)
        listed.append(f"{name} ({models})" if models else name)
    return f"what the model predicts, which sets the loss, the test metric and the built-in models: {', '.join(listed)}"


def _dataset_help() -> str:
    users: dict[str, list[str]] = {}  # dataset -> the tasks that have it built in
    for name in task_names():
        for dataset in get_task(name).datasets:
            users.setdefault(dataset, []).append(name)
    listed = ", ".join(f"{dataset} ({', '.join(tasks)})" for dataset, tasks in users.items())
    return f"built-in dataset (default: the task's first): {listed}"


def _data_help() -> str:
    listed = ", ".join(f"{get_task(name).folder_layout} for {name}" for name in task_names())
    return f"your own data, used instead of --dataset: {listed}"


def _budget_list(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise DiscoError(f"expected budgets separated by commas, e.g. 0.2,0.1,0.05; got {text!r}") from None


TOPOLOGY = "topology.json"  # a latency-budget run's own copy of its topology, in its folder
UNEVEN_SPEEDS = 1.25  # a topology whose fastest node is this much faster than its slowest weights the split


@dataclass(kw_only=True)
class TrainConfig:
    """All options of a training run, validated in one place (saved as config.json in the run folder). Each
    field is one option of `disco train` (disco.fields): its help says what it does."""

    model: str = option(help=f"{MODEL_SPECS} (required unless --resume)", required=False)
    model_kwargs: dict = option(default_factory=dict, metavar="K=V,...",
                                help="keyword arguments for the model builder, e.g. width_mult=0.5")
    stem_stride: int | None = option(None, help="stride of the first conv (e.g. 1 for 28x28 images)")
    task: str = option("classification", choices=task_names, help=_task_help)
    dataset: str | None = option(None, help=_dataset_help)  # None: resolved to the task's default
    data: str | None = option(None, metavar="PATH", help=_data_help)
    image_size: int | None = option(None, help="resize --data images to this square size (the photo recipe: crop to "
                                               "it, default 224; otherwise, default: an ImageFolder's "
                                               "images keep the first training image's size, and are resized to it "
                                               "when sizes differ; fashion-scenes: the canvas side, default "
                                               f"{SceneOptions.canvas})")
    recipe: str = option("auto", choices=RECIPES, help="how --data images are read: small (resized, nothing more), "
                         "photo (ImageNet's: random resized crop and flip in training, resize and centre crop in "
                         "evaluation and deployment, ImageNet mean/std; --image-size default 224), auto (photo when "
                         "the first training image's shorter side is at least 128 pixels)")
    skip_bad_data: bool = option(False, help="leave out the --data files that cannot be used (corrupt, truncated, "
                                             "not an image, an unreadable mask) and say how many; by default the "
                                             "first one stops the run before training, named")
    nodes: int = option(2, help="devices to split across")
    node_weights: list = option(default_factory=list, type=lambda text: list(parse_weights(text)), metavar="W,W,...",
                                help="each node's share of every layer's work, e.g. 2,1,1 for a first node twice "
                                     "as fast as the two others (disco probe measures the speeds); default: equal")
    budget: float = option(0.2, help="bytes allowed, as a fraction of the dense split's: 0..1, 0 = no "
                                     "communication, 0.2 = 5x less")
    latency_budget_ms: float | None = option(None, help="train to a predicted latency per image instead of a byte "
                                             "budget (needs --topology): groups are priced by their time on the "
                                             "topology's links and nodes, and the plan's predicted latency "
                                             "(disco plan) meets this; --budget is then not used")
    link_budget: list = option(default_factory=list, type=lambda text: parse_link_budgets(text), metavar="S-D=F,K=F",
                               help="per-link byte budgets: 0-3=0.02 lets the link from node 0 to node 3 carry "
                                    "2%% of its dense bytes, 3=0.02 every link of node 3; links not named keep "
                                    "--budget (the simple form of --latency-budget-ms: a slow link gets a smaller "
                                    "share)")
    topology: str | None = option(None, help="topology.json (disco probe, or by hand: docs/method.md 11) for "
                                             "--latency-budget-ms; without --node-weights, nodes are weighted by "
                                             "its compute rates when they differ by 25%% or more")
    method: str = option("learned", choices=METHODS, help="how groups are chosen: learned (DISCO: gradient "
                         "importance per byte), gates (learned gate scores, straight-through) or random (baseline)")
    nested: list = option(default_factory=list, type=lambda text: _budget_list(text), metavar="B,B,...",
                          help="larger budgets whose masks contain --budget's, e.g. 0.2,0.1,0.05 with --budget 0.02: "
                               "one model for all of them (fine-tuning trains every one at each step; the report "
                               "scores each; `disco export --budget B` exports one, `--budgets all` all in one "
                               "deployment)")
    epochs: int = option(2, help="epochs of each phase unless set below")
    dense_epochs: int | None = option(None, help="epochs training the dense model (default: --epochs)")
    sparsify_epochs: int | None = option(None, help="epochs driving masks to the budget (default: --epochs)")
    finetune_epochs: int | None = option(None, help="epochs fine-tuning with frozen masks (default: --epochs)")
    weights: str | None = option(None, help="dense weights to start from (.safetensors, or a weights-only .pth); "
                                            "skips dense training, unless their classifier is for another number "
                                            "of classes (timm, hf models): the dense phase then trains from them")
    dense_run: str | None = option(None, help="a previous run folder whose dense.safetensors to start from")
    distill: bool = option(True, help="fine-tune with the task's loss only (default: distil from the dense model)")
    temperature: float = option(4.0, help="distillation temperature")
    distill_weight: float = option(0.7, help="weight of distillation in the fine-tuning loss (the task's loss "
                                             "gets the rest)")
    batch_size: int = option(128, help="images per optimiser step, over all processes (the global batch: a run "
                                       "trains alike on any number of processes, and resumes on another)")
    micro_batch: int | None = option(None, help="images one process computes at once (default: --batch-size "
                                                "divided by the processes): smaller ones accumulate their "
                                                "gradients to the global batch, for memory; BatchNorm normalises "
                                                "each micro-batch on its own")
    workers: int = option(0, help="processes reading and transforming the data while the model trains (0: in the "
                                   "training process); the result does not depend on it")
    precision: str = option("fp32", choices=PRECISIONS, help="arithmetic of the training forward pass: fp32, or "
                            "bf16 / fp16 under autocast (fp16 with loss scaling); weights, masks and evaluation "
                            "stay fp32")
    lr: float = option(2e-3, help="AdamW learning rate of the dense phase, cosine-decayed per phase")
    # measured on Fashion-MNIST/mobilenet_v2: 0.25 left the pruned model too little room to adapt (-4.8 points
    # at budget 0.1 on 2 nodes), hence 1
    sparse_lr_scale: float = option(1.0, help="learning rate of the sparsify and fine-tune phases, as a "
                                              "fraction of --lr")
    min_phase_steps: int = option(300, help="fewest optimiser steps of each sparse phase (sparsify, fine-tune): "
                                            "small data is repeated for more epochs than asked, so masks are never "
                                            "cut faster than the model can follow (docs/method.md 4)")
    lr_warmup: float = option(0.05, help="fraction of each sparse phase's steps over which its learning rate "
                                         "warms up linearly (its optimiser restarts on a trained model)")
    weight_decay: float = option(1e-4, help="AdamW weight decay")
    regularization: float = option(1e-4, help="bytes-weighted group lasso strength")
    train_subset: int | None = option(None, help="train on only this many images (quick runs)")
    test_subset: int | None = option(None, help="evaluate on only this many images")
    seed: int = option(0, help="seed for weights, data order and random groups")
    transport_dtype: str = option("fp32", flag="--dtype", choices=lambda: tuple(TRANSPORT_DTYPES),
                                  help="dtype activations cross the network in (int8/int4: quantised with a scale "
                                       "per channel; sparsify and fine-tune train for its rounding; the budget and "
                                       "the report count its bytes)")
    out: str = option(help="run folder, e.g. runs/NAME")

    def __post_init__(self) -> None:
        if self.task not in task_names():
            raise DiscoError(f"unknown --task {self.task!r}; known: {', '.join(task_names())}")
        if self.dataset is None:
            self.dataset = get_task(self.task).default_dataset
        for phase in PHASES:  # --epochs stands in for the phases not set
            if self.phase_epochs(phase) is None:
                setattr(self, f"{phase}_epochs", self.epochs)
        if not 0.0 <= self.budget <= 1.0:
            raise DiscoError(f"--budget must be in [0, 1] (a fraction of the dense split's bytes), got {self.budget}")
        if not 2 <= self.nodes <= MAX_NODES:  # one node has no channel to send: nothing to train the masks for
            raise DiscoError(f"--nodes must be between 2 and {MAX_NODES}, got {self.nodes}: DISCO learns what "
                             "nodes send each other, and one node sends nothing (train and run the plain model)")
        self._check_latency_budget()
        if self.link_budget:
            if self.latency_budget_ms is not None or self.nested:
                raise DiscoError("--link-budget cannot be combined with --latency-budget-ms or --nested")
            link_fractions(self.link_budget, self.nodes, self.budget)
        self.node_weights = list(check_weights(self.node_weights or None, self.nodes) or [])
        if self.method not in METHODS:
            raise DiscoError(f"unknown --method {self.method!r}; known: {', '.join(METHODS)}")
        if self.workers < 0:
            raise DiscoError(f"--workers must not be negative, got {self.workers}")
        if self.recipe not in RECIPES:
            raise DiscoError(f"unknown --recipe {self.recipe!r}; known: {', '.join(RECIPES)}")
        if self.precision not in PRECISIONS:
            raise DiscoError(f"unknown --precision {self.precision!r}; known: {', '.join(PRECISIONS)}")
        for name in ("epochs", "dense_epochs", "sparsify_epochs", "finetune_epochs"):
            if getattr(self, name) < 0:
                raise DiscoError(f"--{name.replace('_', '-')} must not be negative")
        if self.sparsify_epochs == 0 and self.budget < 1.0:
            raise DiscoError("a budget below 1 needs at least one --sparsify-epochs to reach it")
        if self.batch_size < 1 or self.lr <= 0 or self.sparse_lr_scale <= 0:
            raise DiscoError("--batch-size must be at least 1, --lr and --sparse-lr-scale positive")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise DiscoError(f"--micro-batch must be at least 1, got {self.micro_batch}")
        self.nested = sorted((float(b) for b in self.nested), reverse=True)
        if self.nested:
            check_nested(tuple(self.nested), self.budget)
            if self.method == "random" or self.budget == 0.0:
                raise DiscoError("--nested needs --method learned or gates and a --budget above 0")
        if self.min_phase_steps < 0 or not 0.0 <= self.lr_warmup < 1.0:
            raise DiscoError("--min-phase-steps must not be negative and --lr-warmup must be in [0, 1)")
        if self.transport_dtype not in TRANSPORT_DTYPES:
            raise DiscoError(f"unknown transport dtype {self.transport_dtype!r}")
        if self.data is not None and not Path(self.data).exists():
            raise DiscoError(f"--data path not found: {self.data}")
        for path in (self.weights, self.dense_run):
            if path is not None and not Path(path).exists():
                raise DiscoError(f"not found: {path}")

    def _check_latency_budget(self) -> None:
        if self.latency_budget_ms is None:
            if self.topology is not None:
                raise DiscoError("--topology is read with --latency-budget-ms; give both (or neither)")
            return
        if self.topology is None:
            raise DiscoError("--latency-budget-ms needs --topology (topology.json, from disco probe or by hand)")
        if not self.latency_budget_ms > 0:
            raise DiscoError(f"--latency-budget-ms must be positive, got {self.latency_budget_ms}")
        if self.nested:
            raise DiscoError("--nested budgets are byte budgets: train a latency budget on its own")
        topology = self.load_topology()
        topology.check_nodes(self.nodes, f"--nodes {self.nodes}")
        speeds = topology.speeds()
        if not self.node_weights and min(speeds) < 1 / UNEVEN_SPEEDS:  # probed rates of equal nodes differ a little
            self.node_weights = speeds

    def load_topology(self):
        """The run's topology: the copy its folder keeps (written when the run starts, so a resumed or moved run
        prices groups as it began), else the file --topology names."""
        from disco.topology import Topology

        kept = Path(self.out) / TOPOLOGY
        return Topology.load(kept if kept.is_file() else self.topology)

    def partition_options(self) -> dict:
        """How the run splits its model (the keyword arguments of disco.partition besides the model and input)."""
        return {"nodes": self.nodes, "transport_dtype": self.transport_dtype,
                "node_weights": tuple(self.node_weights) or None}

    def load_data(self) -> DataSpec:
        """The run's data, cut to train_subset / test_subset (the same samples in training, export and eval)."""
        from disco.tasks.data import load_task_data

        return load_task_data(self.task, self.dataset, self.data, seed=self.seed, train_size=self.train_subset,
                              test_size=self.test_subset, image_size=self.image_size,
                              skip_bad_data=self.skip_bad_data, recipe=self.recipe)

    def phase_epochs(self, phase: str) -> int:
        return getattr(self, f"{phase}_epochs")

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> "TrainConfig":
        if not path.is_file():
            raise DiscoError(f"no run configuration at {path}")
        values = read_json(path, what="run configuration", max_bytes=SMALL_JSON_BYTES)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})
