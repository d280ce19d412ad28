"""Fold an inference BatchNorm into the channel-mixing layer that feeds it, on one rank.

A conv followed by BatchNorm (eval: fixed statistics) is one affine map per output channel; scaling the rank's
weight rows (local and remote blocks alike) and bias by it removes a full pass over the activation per layer.
The BatchNorm's channels on a rank are the conv's output rows there (both held by the same owner map), so the
fold is local: nothing changes on the wire. Only folds whose result is exact up to float rounding are made:
the conv output must feed nothing but the BatchNorm.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from disco.runtime.comm import Comm
from disco.runtime.mixing import GroupedMixingStep, MixingStep
from disco.runtime.steps import Exchanging, Local, Step

aten = torch.ops.aten
# inference BatchNorms as captured graphs have them: (input, weight, bias, running_mean, running_var, ...)
BATCH_NORMS = (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default)


@dataclass
class Folded(Step):
    """A BatchNorm folded into the conv before it: its value is the conv's (the native form's extra outputs,
    which nothing reads, are empty)."""

    source: object
    native: bool

    def run(self, env: dict, comm: Comm):
        value = env[self.source]
        return (value, value.new_empty(0), value.new_empty(0)) if self.native else value


def fold_batch_norms(steps: list[Step], tensors_of) -> list[Step]:
    """The steps with every foldable BatchNorm folded into its conv (and replaced by a Folded step).
    `tensors_of(graph_node)`: this rank's values of a graph node's weight, bias, mean and variance (None where
    absent)."""
    by_graph_node = {step.graph_node: index for index, step in enumerate(steps)}
    steps = list(steps)
    for index, step in enumerate(steps):
        if not _is_frozen_norm(step):
            continue
        source = step.graph_node.args[0]
        producer = steps[by_graph_node[source]] if source in by_graph_node else None
        if isinstance(producer, Exchanging) and len(source.users) == 1 and \
                _fold(producer.call, *tensors_of(step.graph_node), _eps(step.graph_node)):
            steps[index] = Folded(step.graph_node, source, step.graph_node.target is not aten.batch_norm.default)
    return steps


def _eps(graph_node) -> float:
    return graph_node.args[7] if graph_node.target is aten.batch_norm.default else graph_node.args[6]


def _is_frozen_norm(step: Step) -> bool:
    graph_node = step.graph_node
    if not isinstance(step, Local) or graph_node.target not in BATCH_NORMS or step.operands.moves or \
            step.operands.narrowings:
        return False
    training = graph_node.target is aten.batch_norm.default and graph_node.args[5]
    return not training and graph_node.args[3] is not None and graph_node.args[4] is not None


def _fold(layer, weight, bias, mean, variance, eps: float) -> bool:
    """Scale the layer's rows by the norm; False (layer untouched) when the shapes do not line up."""
    if not isinstance(layer, (MixingStep, GroupedMixingStep)) or getattr(layer, "channel_dim", 1) != 1:
        return False
    blocks = ["local_weight", "remote_weight"] if isinstance(layer, MixingStep) else ["weight"]
    rows = mean.numel()
    weights = [getattr(layer, name) for name in blocks]
    if not rows or any(w is not None and w.shape[0] != rows for w in weights):
        return False
    scale = (weight if weight is not None else 1) * torch.rsqrt(variance + eps)
    shift = (bias if bias is not None else 0) - mean * scale
    for name, block in zip(blocks, weights):
        if block is not None:
            setattr(layer, name, block * scale.reshape(-1, *[1] * (block.dim() - 1)).to(block.dtype))
    layer.bias = shift if layer.bias is None else layer.bias * scale + shift
    return True
