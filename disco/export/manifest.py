"""The deployment manifest: everything a rank needs besides its own shard, as versioned JSON.

A rank rebuilds the architecture from `model` (on the meta device: no weights), re-runs the owner
propagation with each layer's exported output assignment, and checks that the channels it then expects
agree with `layers`: the split plan of every channel-mixing layer (disco/split/plan.py), serialised.
`shards` holds the sha256 of every node's safetensors file, checked before any communication. No pickle:
JSON and safetensors only.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from disco.errors import DiscoError
from disco.options import MAX_NODES
from disco.split.plan import SplitPlan
from disco.transport import RUNTIME_DTYPES

FORMAT = "disco-deployment"
FORMAT_VERSION = 2  # 2: layers hold each layer's SplitPlan; shards one `weight.remote` block per layer
MANIFEST_NAME = "manifest.json"


@dataclass
class ModelSpec:
    """How to rebuild the architecture: `disco.models.build_for_data(model, channels=..., classes=...,
    stem_stride=..., **kwargs)`. `model` is torchvision:NAME or path/to/file.py:factory."""

    model: str
    channels: int
    classes: int
    kwargs: dict = field(default_factory=dict)
    stem_stride: int | None = None


@dataclass
class Manifest:
    model: ModelSpec
    nodes: int
    input_shape: list[int]  # one input without the batch dimension, e.g. [1, 28, 28]
    transport_dtype: str
    layers: dict[str, SplitPlan]  # the split plan of every channel-mixing layer
    shards: list[dict]  # [{"file": "node0.safetensors", "sha256": ...}] in node order
    expected: dict  # the simulation's cost report per image (bytes_matrix, io_bytes, ...)
    preprocess: dict | None = None  # {"channels", "size", "mean", "std"} for reading image files
    dataset: dict | None = None  # {"dataset", "data", "image_size", "test_subset", "seed"} for --eval
    class_names: list[str] | None = None
    reference: dict | None = None  # the simulation's result to compare with, e.g. {"accuracy": ...}
    task: str = "classification"  # how node 0 reads the output: classification, segmentation, detection, superres
    format: str = FORMAT
    version: int = FORMAT_VERSION

    def save(self, folder: Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        fields_ = asdict(replace(self, layers={}))  # one line per top-level field: readable, yet compact
        fields_["layers"] = {name: plan.to_json() for name, plan in self.layers.items()}
        path.write_text("{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in fields_.items()) + "\n}\n")
        return path

    @classmethod
    def load(cls, folder: Path) -> "Manifest":
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise DiscoError(f"no {MANIFEST_NAME} in {folder}: export a deployment with `disco export` first")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise DiscoError(f"{path} is not valid JSON ({error}); export the deployment again") from error
        if raw.get("format") != FORMAT or raw.get("version") != FORMAT_VERSION:
            raise DiscoError(f"{path} is not a {FORMAT} manifest of version {FORMAT_VERSION} "
                             f"(found format {raw.get('format')!r}, version {raw.get('version')!r}); export the "
                             "deployment again with this version of disco (`disco export RUN --out DIR`)")
        try:
            raw["model"] = ModelSpec(**raw["model"])
            raw["layers"] = {name: _plan(name, plan, raw["nodes"]) for name, plan in raw["layers"].items()}
            manifest = cls(**raw)
        except (KeyError, TypeError, AttributeError) as error:
            raise DiscoError(f"{path} is missing or has unexpected fields ({error})") from error
        manifest.validate()
        return manifest

    def validate(self) -> None:
        if not 1 <= self.nodes <= MAX_NODES or len(self.shards) != self.nodes:
            raise DiscoError(f"manifest lists {len(self.shards)} shards for {self.nodes} nodes")
        if self.transport_dtype not in RUNTIME_DTYPES:
            raise DiscoError(f"transport dtype {self.transport_dtype!r} is not supported by the runtime "
                             f"(supported: {', '.join(RUNTIME_DTYPES)})")
        if not isinstance(self.task, str):  # whether the task is known is the runtime's to say (task registry)
            raise DiscoError(f"manifest task must be a task name, got {self.task!r}")
        for name, plan in self.layers.items():
            if plan.nodes != self.nodes:
                raise DiscoError(f"layer {name!r} is planned for {plan.nodes} nodes, the deployment for {self.nodes}")

    def shard_path(self, folder: Path, node: int) -> Path:
        return Path(folder) / self.shards[node]["file"]


def _plan(name: str, raw: dict, nodes: int) -> SplitPlan:
    try:
        return SplitPlan.from_json(raw, nodes)
    except DiscoError as error:
        raise DiscoError(f"layer {name!r}: {error}") from None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_shard(manifest: Manifest, folder: Path, node: int) -> Path:
    """The node's shard path, after checking it exists and matches the manifest's sha256."""
    path = manifest.shard_path(folder, node)
    if not path.is_file():
        raise DiscoError(f"shard of node {node} not found: {path}")
    actual = sha256_of(path)
    if actual != manifest.shards[node]["sha256"]:
        raise DiscoError(f"shard {path} does not match the manifest (sha256 {actual[:12]}... != "
                         f"{manifest.shards[node]['sha256'][:12]}...): it was corrupted or replaced; "
                         "copy the deployment again")
    return path
