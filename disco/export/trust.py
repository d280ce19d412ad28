"""Which code a deployment may make a node run: a deployment is data, never code.

A manifest names either a registered model (`torchvision:NAME`, `disco:NAME`: code installed with torchvision or
disco) or a user's own model file by its file name, factory and sha256. The file itself is never taken from the
manifest: the person running names it (`disco run --model-code FILE`), and it must be the file whose hash the
manifest records. So whoever can edit a deployment folder cannot make a node import anything.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from disco.errors import DiscoError
from disco.export.manifest import ModelSpec, sha256_of
from disco.models import REGISTERED_SOURCES, build_for_data, split_spec


def deployable_spec(spec: str) -> tuple[str, str | None]:
    """At export: (the spec the manifest records, sha256 of the model file or None). A user's file is recorded
    by its name only (`tiny_model.py:make_model`): where it lay on the exporting machine is no business of the
    nodes."""
    source, factory = split_spec(spec)
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
    """The deployment's architecture with fresh weights (call under `torch.device("meta")` for none)."""
    return build_for_data(model_to_build(spec, model_code), channels=spec.channels, classes=spec.classes,
                          stem_stride=spec.stem_stride, **spec.kwargs)
