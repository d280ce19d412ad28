"""The deployment manifest: everything a rank needs besides its own shard, as versioned JSON.

A rank rebuilds the architecture from `model` (on the meta device: no weights), re-runs the owner
propagation with each layer's exported output assignment, and checks that the channels it then expects
agree with `plans` (JSON key `layers`): the split plan of every channel-mixing layer (disco/split/plan.py),
serialised.
`shards` holds the sha256 of every node's safetensors file, checked before any communication, and every shard's
metadata holds the digest of the rest of the manifest (`Manifest.digest`: the plans, model, dtype... it was cut
for) and its node, so no edit of the manifest and no swap of shards goes unnoticed. The model is data too:
a registered name, or a user's file named by its hash (disco/export/trust.py). No pickle: JSON and
safetensors only; shard names are plain file names in the deployment folder.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from disco.accounting.costs import ExpectedCosts
from disco.errors import DiscoError
from disco.jsonfile import read_json
from disco.export.budgets import NestedBudgets
from disco.model_sources import weight_kwargs
from disco.models import REGISTERED_SOURCES, split_spec
from disco.options import MAX_NODES
from disco.split.plan import SplitPlan
from disco.transport import check_scheme

FORMAT = "disco-deployment"
# 2: layers hold each layer's SplitPlan; 3: model spec registered or bound to a file hash, shards carry the digest;
# 4: transport_scheme names how messages are encoded (integer dtypes), input and output travel as fp32
# 5: `nested`: several nested budgets in one deployment (disco/export/budgets.py)
# 6: ranks capture the model with torch.export (any model): `graph_digest`, shards keyed by the tensors operations
#    read (parameters by name, computed ones `static.NODE`), timm: and hf: models
FORMAT_VERSION = 6
MANIFEST_NAME = "manifest.json"
SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,200}\.safetensors")  # a plain file name: no folder, no ".."
SHA256 = re.compile(r"[0-9a-f]{64}")
HF_MODEL_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,100}")  # `hf:vit`, `hf:data2vec-vision`: a name, never a folder
DIGEST_KEY, NODE_KEY = "disco.manifest_digest", "disco.node"  # each shard's safetensors metadata
# `Manifest.plans` in the JSON: the field's first name, kept so that deployments exported before still load
PLANS_KEY = "layers"
MAX_MANIFEST_BYTES = 256 << 20  # the largest plans (thousands of channels per layer, hundreds of layers) are ~50 MB
MAX_NAME_CHARS = 200
# each top-level field's JSON type (None: may be null), checked before any field is read
FIELD_TYPES = {"model": dict, "nodes": int, "input_shape": list, "transport_dtype": str, PLANS_KEY: dict,
               "shards": list, "expected": dict, "preprocess": (dict, None), "dataset": (dict, None),
               "class_names": (list, None), "reference": (dict, None), "task": str, "transport_scheme": str,
               "nested": (dict, None), "graph_digest": str, "format": str, "version": int}


@dataclass
class ModelSpec:
    """How to rebuild the architecture: `disco.models.build_for_data(model, channels=..., classes=...,
    stem_stride=..., **kwargs)`. `model` is torchvision:NAME, timm:NAME, hf:MODEL_TYPE, disco:NAME, or
    FILE.py:factory for a user's model file, which the deployment names by its sha256 (`code_sha256`) and never
    carries (disco/export/trust.py)."""

    model: str
    channels: int
    classes: int
    kwargs: dict = field(default_factory=dict)
    stem_stride: int | None = None
    code_sha256: str | None = None

    def validate(self) -> None:
        if not isinstance(self.kwargs, dict) or weight_kwargs(self.kwargs):
            raise DiscoError("model kwargs must be a dict and may not ask for weights, checkpoints or remote code: a "
                             "deployment's weights are its shards (nothing is downloaded, no model code is run)")
        source, name = split_spec(self.model)
        if source == "hf" and not HF_MODEL_TYPE.fullmatch(name):
            raise DiscoError(f"model {self.model!r} must name a transformers model type (hf:vit): a deployment "
                             "never names a folder")
        if source in REGISTERED_SOURCES:
            return
        if "/" in source or "\\" in source or not source.endswith(".py") or not SHA256.fullmatch(
                str(self.code_sha256)):
            raise DiscoError(f"model {self.model!r} is neither registered ({', '.join(REGISTERED_SOURCES)}) nor a "
                             "model file name with its sha256; a deployment names code, it never carries it")


@dataclass
class Manifest:
    model: ModelSpec
    nodes: int
    input_shape: list[int]  # one input without the batch dimension, e.g. [1, 28, 28]
    transport_dtype: str
    plans: dict[str, SplitPlan]  # the split plan of every channel-mixing layer, by layer name (JSON: PLANS_KEY)
    shards: list[dict]  # [{"file": "node0.safetensors", "sha256": ..., "bytes": ...}] in node order
    expected: dict  # the simulation's cost report per image (bytes_matrix, io_bytes, ...); nested: the default's
    preprocess: dict | None = None  # {"channels", "size", "mean", "std"} for reading image files
    dataset: dict | None = None  # {"dataset", "data", "image_size", "test_subset", "seed", "skip_bad_data"}: --eval
    class_names: list[str] | None = None
    reference: dict | None = None  # the simulation's result to compare with, e.g. {"accuracy": ...}
    task: str = "classification"  # how node 0 reads the output: classification, segmentation, detection, superres
    transport_scheme: str = ""  # how transport_dtype's messages are laid out (disco/transport.py: TransportDtype.scheme)
    nested: dict | None = None  # several nested budgets (disco/export/budgets.py): `plans` plan the largest
    graph_digest: str = ""  # the captured graph's fingerprint (disco/split/capture.py): ranks must capture the same
    format: str = FORMAT
    version: int = FORMAT_VERSION

    def as_json(self) -> dict:
        fields_ = asdict(replace(self, plans={}))
        fields_["plans"] = {name: plan.to_json() for name, plan in self.plans.items()}
        # renamed where it stands: the JSON's keys keep the fields' order
        return {PLANS_KEY if key == "plans" else key: value for key, value in fields_.items()}

    def digest(self) -> str:
        """sha256 of everything but the shard list: what the shards were cut for (their metadata holds it)."""
        content = {k: v for k, v in self.as_json().items() if k != "shards"}
        return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def identity(self) -> str:
        """The deployment these contents describe: the digest and every shard's sha256 (a re-export with other
        weights but the same plan has another identity)."""
        shards = ",".join(str(shard.get("sha256")) for shard in self.shards)
        return hashlib.sha256(f"{self.digest()}:{shards}".encode()).hexdigest()

    def save(self, folder: Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        fields_ = self.as_json()  # one line per top-level field: readable, yet compact
        path.write_text("{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in fields_.items()) + "\n}\n")
        return path

    @classmethod
    def load(cls, folder: Path) -> "Manifest":
        path = Path(folder) / MANIFEST_NAME
        if not path.exists():
            raise DiscoError(f"no {MANIFEST_NAME} in {folder}: export a deployment with `disco export` first")
        inside_folder(path, folder, "the manifest")
        raw = read_json(path, what="manifest", max_bytes=MAX_MANIFEST_BYTES)
        if raw.get("format") != FORMAT or raw.get("version") != FORMAT_VERSION:
            raise DiscoError(f"{path} is not a {FORMAT} manifest of version {FORMAT_VERSION} "
                             f"(found format {raw.get('format')!r}, version {raw.get('version')!r}); export the "
                             "deployment again with this version of disco (`disco export RUN --out DIR`)")
        _check_field_types(raw, path)
        try:
            raw["model"] = ModelSpec(**raw["model"])
            raw["plans"] = {name: _plan(name, plan, raw["nodes"]) for name, plan in raw.pop(PLANS_KEY).items()}
            manifest = cls(**raw)
        except (KeyError, TypeError, AttributeError) as error:
            raise DiscoError(f"{path} is missing or has unexpected fields ({error})") from error
        manifest.validate()
        return manifest

    def validate(self) -> None:
        if not 1 <= self.nodes <= MAX_NODES or len(self.shards) != self.nodes:
            raise DiscoError(f"manifest lists {len(self.shards)} shards for {self.nodes} nodes")
        check_scheme(self.transport_dtype, self.transport_scheme)
        if not isinstance(self.task, str):  # whether the task is known is the runtime's to say (task registry)
            raise DiscoError(f"manifest task must be a task name, got {self.task!r}")
        self.model.validate()
        self._validate_shards()
        self._validate_class_names()
        for name, plan in self.plans.items():
            if plan.nodes != self.nodes:
                raise DiscoError(f"layer {name!r} is planned for {plan.nodes} nodes, the deployment for {self.nodes}")
        self.budgets()
        for level in range(len(self.budgets().budgets) if self.nested is not None else 1):
            try:
                self.expected_at(level)
            except (KeyError, TypeError, ValueError, AttributeError) as error:
                raise DiscoError(f"the manifest's expected costs (level {level}) are malformed ({error}); export "
                                 "again") from None

    def _validate_class_names(self) -> None:
        """Names are printed on terminals and pages: control characters (escape sequences) are refused."""
        names = self.class_names or []
        if not all(isinstance(n, str) and n.isprintable() and len(n) <= MAX_NAME_CHARS for n in names):
            raise DiscoError(f"the manifest's class names must be printable strings of at most {MAX_NAME_CHARS} "
                             "characters (no control characters)")

    def budgets(self) -> NestedBudgets | None:
        """The nested budgets the deployment carries (checked against its plans), or None: it carries one."""
        if self.nested is None:
            return None
        cached = self.__dict__.get("_budgets")  # parsed once per `nested` value: a check reads every channel
        if cached is None or cached[0] is not self.nested:
            cached = self.__dict__["_budgets"] = (self.nested, NestedBudgets.from_json(self.nested, self.plans))
        return cached[1]

    def level_of(self, budget: float | None) -> int:
        """The level a run at `budget` uses (None: the deployment's default); a deployment of one budget has
        level 0 only, and names it when asked for another."""
        nested = self.budgets()
        if nested is not None:
            return nested.level_of(budget)
        ratio = self.expected_at(0).ratio
        if budget is not None and (ratio is None or abs(budget - ratio) > 0.01):
            raise DiscoError(f"the deployment carries one budget (ratio {ratio:.4f} of the dense bytes); export the "
                             "run with --budgets to carry several, or leave out --budget")
        return 0

    def expected_at(self, level: int) -> ExpectedCosts:
        """The simulation's costs per image at `level` (the manifest's JSON `expected`, typed)."""
        return ExpectedCosts.from_json(self.expected if self.nested is None else self.nested["expected"][level])

    def reference_at(self, level: int) -> dict | None:
        """The simulation's score at `level`."""
        return self.reference if self.nested is None else self.nested["reference"][level]

    def _validate_shards(self) -> None:
        """Before any file is opened: every shard a plain, distinct file name in the folder, with a sha256."""
        for node, shard in enumerate(self.shards):
            if not isinstance(shard, dict):
                raise DiscoError(f'shard {node} must be an entry {{"file": NAME, "sha256": HASH}}, got {shard!r}')
            name = shard.get("file")
            if not SHARD_NAME.fullmatch(str(name)) or ".." in str(name):
                raise DiscoError(f"shard {node} must be a plain .safetensors file name inside the deployment folder "
                                 f"(no folders, no '..'), got {name!r}")
            if not SHA256.fullmatch(str(shard.get("sha256"))):
                raise DiscoError(f"shard {node} has no valid sha256 in the manifest")
            size = shard.get("bytes", 0)  # absent in deployments exported before it was recorded
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise DiscoError(f"shard {node} has an invalid size in the manifest: {size!r}")
        if len({shard["file"] for shard in self.shards}) != len(self.shards):
            raise DiscoError("the manifest names one shard file for several nodes")

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


def inside_folder(path: Path, folder: Path, what: str) -> None:
    """A deployment reads only its own files: no symbolic link (it could point anywhere, to a device or a file
    that merely matches), nothing whose real location is outside the folder. Checked before the file is opened."""
    if path.is_symlink() or path.resolve().parent != Path(folder).resolve():
        raise DiscoError(f"{what} {path} is a symbolic link or lies outside {folder}: a deployment reads only "
                         "regular files in its own folder; copy the files in")


def verify_shard(manifest: Manifest, folder: Path, node: int) -> Path:
    """The node's shard path, after checking it exists and matches the manifest's sha256."""
    path = manifest.shard_path(folder, node)
    inside_folder(path, folder, f"shard of node {node}")
    if not path.is_file():
        raise DiscoError(f"shard of node {node} not found: {path}")
    expected = manifest.shards[node].get("bytes")
    if expected is not None and path.stat().st_size != expected:  # before hashing: a replaced 60 GB file costs 0 s
        raise DiscoError(f"shard {path} has {path.stat().st_size:,} bytes, the manifest says {expected:,}: it was "
                         "truncated or replaced; copy the deployment again")
    if sha256_of(path) != manifest.shards[node]["sha256"]:
        raise DiscoError(f"shard {path} does not match the manifest's sha256: it was corrupted or replaced; "
                         "copy the deployment again")
    metadata = shard_metadata(path)
    if metadata.get(NODE_KEY) != str(node):
        raise DiscoError(f"shard {path} holds the weights of node {metadata.get(NODE_KEY)}, not of node {node}: the "
                         "manifest's shard list was edited; copy the deployment again")
    if metadata.get(DIGEST_KEY) != manifest.digest():
        raise DiscoError(f"shard {path} was cut for another manifest: manifest.json was edited after export (its "
                         "plan, model or options differ from what the shards hold); copy or export it again")
    return path


def shard_metadata(path: Path) -> dict[str, str]:
    import safetensors  # here: this module otherwise needs only JSON

    try:
        with safetensors.safe_open(str(path), framework="pt") as shard:
            return shard.metadata() or {}
    except Exception as error:  # a file that matched its hash yet is no safetensors: a forged manifest entry
        raise DiscoError(f"{path} is not a safetensors shard ({type(error).__name__})") from None


def _check_field_types(raw: dict, path: Path) -> None:
    for key, value in raw.items():
        allowed = FIELD_TYPES.get(key)
        if allowed is None:
            raise DiscoError(f"{path} has an unknown field {key!r}; export the deployment again")
        kinds = allowed if isinstance(allowed, tuple) else (allowed,)
        if not any(value is None if kind is None else isinstance(value, kind) and not isinstance(value, bool)
                   for kind in kinds):
            raise DiscoError(f"{path}: field {key!r} has the wrong type ({type(value).__name__}); export the "
                             "deployment again")
