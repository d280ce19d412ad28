"""Editing a model's module tree, and reading/writing its BatchNorm running statistics."""
from __future__ import annotations

import torch
from torch import nn

from disco.errors import DiscoError


def replace_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted path `name` of `model` (e.g. "layer1.0.conv1")."""
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def running_norms(model: nn.Module) -> list[nn.Module]:
    """The model's BatchNorm layers that keep running statistics (what evaluation normalises with)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def norm_statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's BatchNorm running statistics, by state-dict name."""
    return {f"{name}.{buffer}": getattr(module, buffer).detach().clone()
            for name, module in model.named_modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)
            and module.track_running_stats for buffer in ("running_mean", "running_var")}


def load_norm_statistics(model: nn.Module, statistics: dict[str, torch.Tensor]) -> None:
    buffers = dict(model.named_buffers())
    missing = set(statistics) - set(buffers)
    if missing:
        raise DiscoError(f"the nested statistics name buffers this model lacks ({sorted(missing)[:3]}...)")
    with torch.no_grad():
        for name, value in statistics.items():
            buffers[name].copy_(value)
