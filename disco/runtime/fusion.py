"""Fold an inference BatchNorm into the channel-mixing layer that feeds it, on one rank.

A conv followed by BatchNorm (eval: fixed statistics) is one affine map per output channel; scaling the rank's
weight rows (local and remote blocks alike) and bias by it removes a full pass over the activation per layer.
The BatchNorm's channels on a rank are the conv's output rows there (both held by the same owner map), so the
fold is local: nothing changes on the wire. Only folds whose result is exact up to float rounding are made:
the conv output must feed nothing but the BatchNorm.
"""
from __future__ import annotations

import torch
from torch import nn

from disco.runtime.mixing import GroupedMixingStep, MixingStep
from disco.runtime.steps import Exchanging, Local, Step

FOLDABLE_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fold_batch_norms(steps: list[Step]) -> list[Step]:
    """The steps with every foldable BatchNorm folded into its conv (and replaced by an identity step)."""
    by_node = {step.node: index for index, step in enumerate(steps)}
    steps = list(steps)
    for index, step in enumerate(steps):
        if not _is_frozen_norm(step):
            continue
        source = step.node.args[0]
        producer = steps[by_node[source]] if source in by_node else None
        if isinstance(producer, Exchanging) and len(source.users) == 1 and _fold(producer.call, step.module):
            steps[index] = Local(step.node, nn.Identity())
    return steps


def _is_frozen_norm(step: Step) -> bool:
    module = getattr(step, "module", None)
    return (isinstance(step, Local) and isinstance(module, FOLDABLE_NORMS) and module.running_mean is not None
            and len(step.node.args) == 1 and not step.node.kwargs)


def _fold(layer, norm: nn.Module) -> bool:
    """Scale the layer's rows by the norm; False (layer untouched) when the shapes do not line up."""
    if not isinstance(layer, (MixingStep, GroupedMixingStep)) or getattr(layer, "channel_dim", 1) != 1:
        return False
    blocks = ["local_weight", "remote_weight"] if isinstance(layer, MixingStep) else ["weight"]
    rows = norm.running_mean.numel()
    weights = [getattr(layer, name) for name in blocks]
    if not rows or any(w is not None and w.shape[0] != rows for w in weights):
        return False
    scale = (norm.weight if norm.weight is not None else 1) * torch.rsqrt(norm.running_var + norm.eps)
    shift = (norm.bias if norm.bias is not None else 0) - norm.running_mean * scale
    for name, weight in zip(blocks, weights):
        if weight is not None:
            setattr(layer, name, weight * scale.reshape(-1, *[1] * (weight.dim() - 1)).to(weight.dtype))
    layer.bias = shift if layer.bias is None else layer.bias * scale + shift
    return True
