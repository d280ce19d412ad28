"""Run-folder checkpoints: model tensors in safetensors, the rest loaded with weights_only=True (no pickle)."""
from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from disco.errors import DiscoError


def save_model(model: nn.Module, path: Path) -> None:
    """State dict (parameters, BatchNorm statistics, DISCO plans and masks) as safetensors."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".part")
    safetensors.torch.save_file(state, str(tmp))
    tmp.replace(path)


def load_model_state(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise DiscoError(f"missing checkpoint file {path}")
    state = safetensors.torch.load_file(str(path))
    model.load_state_dict(state, strict=True)


def save_state(state: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".part")
    torch.save(state, tmp)
    tmp.replace(path)


def load_state(path: Path) -> dict:
    if not path.is_file():
        raise DiscoError(f"missing checkpoint file {path}")
    return torch.load(path, map_location="cpu", weights_only=True)
