"""Setting group masks: helpers shared by users, baselines and tests."""
from __future__ import annotations

import torch
from torch import nn

from disco.errors import DiscoError
from disco.split.partitioner import disco_layers


def keep_random_groups(model: nn.Module, fraction: float, *, seed: int = 0) -> None:
    """Keep a uniformly random `fraction` of each layer's communication groups, drop the rest."""
    if not 0.0 <= fraction <= 1.0:
        raise DiscoError(f"fraction must be in [0, 1], got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    for layer in disco_layers(model).values():
        draw = torch.rand(layer.group_mask.shape, generator=generator)
        layer.set_group_mask(draw < fraction)


def keep_all_groups(model: nn.Module) -> None:
    """Back to dense: every communication group kept."""
    for layer in disco_layers(model).values():
        layer.set_group_mask(torch.ones_like(layer.group_mask))
