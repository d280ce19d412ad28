"""Editing a model's module tree."""
from __future__ import annotations

from torch import nn


def replace_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted path `name` of `model` (e.g. "layer1.0.conv1")."""
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def running_norms(model: nn.Module) -> list[nn.Module]:
    """The model's BatchNorm layers that keep running statistics (what evaluation normalises with)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
