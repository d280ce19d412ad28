"""Build a model from a command-line spec: `torchvision:NAME` or `path/to/file.py:factory`."""
from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path

import torchvision
from torch import nn

from disco.errors import DiscoError


def _torchvision_model(name: str, **kwargs) -> nn.Module:
    known = torchvision.models.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models()"
        raise DiscoError(f"unknown torchvision model {name!r}{hint}")
    return torchvision.models.get_model(name, weights=None, **kwargs)


def _factory_model(path: str, factory: str, **kwargs) -> nn.Module:
    file = Path(path)
    if not file.is_file():
        raise DiscoError(f"model file not found: {file}")
    spec = importlib.util.spec_from_file_location(f"disco_user_model_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # the user's file: report what failed in it
        raise DiscoError(f"could not import {file}: {type(error).__name__}: {error}") from error
    builder = getattr(module, factory, None)
    if not callable(builder):
        raise DiscoError(f"{file} has no function named {factory!r}")
    model = builder(**kwargs)
    if not isinstance(model, nn.Module):
        raise DiscoError(f"{file}:{factory}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_model(spec: str, **kwargs) -> nn.Module:
    """`torchvision:resnet50` (random weights) or `my_models.py:make_net` (called with **kwargs)."""
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name:
        raise DiscoError(f"model spec {spec!r} must look like 'torchvision:resnet50' or 'path/to/file.py:factory'")
    if source == "torchvision":
        return _torchvision_model(name, **kwargs)
    return _factory_model(source, name, **kwargs)


def parse_input_size(text: str) -> tuple[int, ...]:
    """'3,224,224' -> (3, 224, 224): the shape of one input, without the batch dimension."""
    try:
        size = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise DiscoError(f"input size {text!r} must be comma-separated integers such as 3,224,224") from None
    if not 1 <= len(size) <= 4 or any(s <= 0 for s in size):
        raise DiscoError(f"input size {text!r} must be 1 to 4 positive integers such as 3,224,224")
    return size
