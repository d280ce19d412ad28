"""Which code a deployment may make a node run: a deployment is data, never code.

A manifest names either a registered model (`torchvision:NAME`, `timm:NAME`, `hf:MODEL_TYPE`, `disco:NAME`: code
installed with torchvision, timm, transformers or disco) or a user's own model file by its file name, factory and
sha256. The file itself is never taken from the manifest: the person running names it (`disco run --model-code
FILE`), and it must be the file whose hash the manifest records. So whoever can edit a deployment folder cannot make
a node import anything. A model built from a transformers folder (`hf:FOLDER`) is recorded as its model type and
the config settings that rebuild it (`hf:vit` with kwargs): the folder itself never travels.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from torch import nn

from disco.errors import DiscoError
from disco.export.manifest import ModelSpec, sha256_of
from disco.model_sources import hf_recorded
from disco.models import REGISTERED_SOURCES, build_for_data, split_spec


def deployable_model(spec: ModelSpec) -> ModelSpec:
    """At export: the model spec the manifest records for `spec` (what the exporting machine built the model
    from). `hf:FOLDER` becomes `hf:MODEL_TYPE` with the folder's config settings (over `spec.kwargs`) as kwargs,
    which rebuild the same architecture; other specs are recorded as deployable_spec says."""
    source, name = split_spec(spec.model)
    folder = hf_recorded(name, spec.kwargs) if source == "hf" else None
    if folder is not None:
        model_type, settings = folder
        return replace(spec, model=f"hf:{model_type}", kwargs=settings, code_sha256=None)
    recorded, code_sha256 = deployable_spec(spec.model)
    return replace(spec, model=recorded, code_sha256=code_sha256)


def deployable_spec(spec: str) -> tuple[str, str | None]:
    """At export: (the spec the manifest records, sha256 of the model file or None). A user's file is recorded
    by its name only (`tiny_model.py:make_model`): where it lay on the exporting machine is no business of the
    nodes. `hf:FOLDER` needs its kwargs recorded too: deployable_model."""
    source, factory = split_spec(spec)
    if source == "hf" and Path(factory).is_dir():
        raise DiscoError(f"{spec} is recorded with its config as model kwargs: export it through "
                         "disco.export.trust.deployable_model")
    if source in REGISTERED_SOURCES:
        return spec, None
    path = Path(source)
    if not path.is_file():
        raise DiscoError(f"model file not found: {path}")
    return f"{path.name}:{factory}", sha256_of(path)


def model_to_build(spec: ModelSpec, model_code: str | Path | None) -> str:
    """The spec a node builds the architecture from: the registered one, or the runner's --model-code file
    after checking it is the one the deployment was exported with."""
    source, factory = split_spec(spec.model)
    if source in REGISTERED_SOURCES:
        if model_code is not None:
            raise DiscoError(f"this deployment uses the registered model {spec.model}; drop --model-code")
        return spec.model
    if model_code is None:
        raise DiscoError(f"this deployment's model is defined in a Python file ({source}); a deployment never "
                         f"runs code by itself: if you trust that file, pass it with --model-code {source}")
    path = Path(model_code)
    if not path.is_file():
        raise DiscoError(f"--model-code file not found: {path}")
    if sha256_of(path) != spec.code_sha256:
        raise DiscoError(f"--model-code {path} is not the model file this deployment was exported with (sha256 "
                         f"differs from the manifest's {spec.code_sha256[:12]}...)")
    return f"{path}:{factory}"


def build_deployed_model(spec: ModelSpec, model_code: str | Path | None) -> nn.Module:
    """The deployment's architecture with fresh weights (disco.models.without_weights for none)."""
    return build_for_data(model_to_build(spec, model_code), channels=spec.channels, classes=spec.classes,
                          stem_stride=spec.stem_stride, **spec.kwargs)
