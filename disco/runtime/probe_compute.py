"""`disco probe`'s compute measurement on one rank (probe.py says how it fits in): the deployment's model with
random weights, BatchNorms folded into their convs (as disco/runtime/fusion.py folds them), batch 1, the rank's
threads. Every conv/linear call is timed alone on the input it got in one forward, and time_i = o + MACs_i / r is
fitted over the calls; o is the node's layer_overhead. Its rate is the whole forward's: M / (T - L * o) for a
forward of T seconds, M MACs and L calls (at most r), so that L * o + M / rate reproduces T (activations, pooling
and additions ride on the MACs).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

from disco.errors import DiscoError
from disco.export.manifest import Manifest
from disco.export.trust import build_deployed_model
from disco.split.attention import replace_attention

LAYER_REPEATS, LAYER_BUDGET_S = 7, 0.2  # per layer call: at most 7 timed runs, none started after 0.2 s
MODEL_REPEATS, MODEL_BUDGET_S = 7, 2.0  # the whole forward


@dataclass
class Compute:
    macs_per_s: float
    overhead_s: float  # the fit's o: what each conv/linear call costs beside its MACs when timed alone
    calls_rate: float  # the fit's r: MAC/s of the calls timed alone (macs_per_s is the whole forward's)
    model_s: float  # the whole forward T (median)
    macs: int  # M: MACs of every conv/linear call
    calls: int  # L


def mixing_macs(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """MACs of one call at the batch it got: a conv's output elements x input channels per group x kernel
    elements (a transposed conv's input elements x output channels per group x kernel elements); a linear's
    output elements (tokens x out features) x in features."""
    if isinstance(module, nn.Linear):
        return y.numel() * module.in_features
    kernel = math.prod(module.kernel_size)
    if module.transposed:
        return x.numel() * (module.out_channels // module.groups) * kernel
    return y.numel() * (module.in_channels // module.groups) * kernel


def build_model(manifest: Manifest, model_code: str | None) -> nn.Module:
    """The deployment's architecture with random weights, as the runtime runs it: attention with separate q/k/v
    linears (the runtime's split attention), eval, each BatchNorm that only a conv feeds folded into it. A model
    torch.fx cannot trace is timed unfolded (its BatchNorms then count as overhead)."""
    model = replace_attention(build_deployed_model(manifest.model, model_code)).eval()
    try:
        return fuse(model, inplace=True).eval()
    except Exception:  # noqa: BLE001 - fx raises many types; folding is an optimisation, not a requirement
        return model


def median_time(call, repeats: int, budget_s: float) -> float:
    """Median seconds of `call()` over up to `repeats` runs, none started after `budget_s`, after one untimed run
    (oneDNN picks its kernels on the first)."""
    call()
    times: list[float] = []
    while len(times) < repeats and sum(times) < budget_s:
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def fit_rate(macs: list[int], times: list[float]) -> tuple[float, float]:
    """(o, r) of time = o + macs / r by least squares, with o >= 0 (refitted through the origin when the free fit
    puts it below 0, or when MACs do not explain the times at all: then r is what the calls give on average)."""
    n = len(macs)
    mean_m, mean_t = sum(macs) / n, sum(times) / n
    spread = sum((m - mean_m) ** 2 for m in macs)
    slope = sum((m - mean_m) * (t - mean_t) for m, t in zip(macs, times)) / spread if spread > 0 else 0.0
    intercept = mean_t - slope * mean_m
    if slope <= 0 or intercept < 0:
        intercept = 0.0
        slope = sum(m * t for m, t in zip(macs, times)) / sum(m * m for m in macs)
    return intercept, 1.0 / slope


def probe_compute(manifest: Manifest, model_code: str | None) -> Compute:
    model = build_model(manifest, model_code)
    x = torch.randn(1, *manifest.input_shape)
    calls: list[tuple[nn.Module, torch.Tensor, int]] = []

    def record(module, args, output):
        calls.append((module, args[0].detach().clone(), mixing_macs(module, args[0], output)))

    mixing = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    hooks = [m.register_forward_hook(record) for m in mixing]
    with torch.no_grad():
        model(x)  # one pass: every conv/linear call's input
        for hook in hooks:
            hook.remove()
        if not calls:
            raise DiscoError("the deployment's model calls no conv or linear layer: nothing to fit a rate to")
        times = [median_time(lambda: module(inputs), LAYER_REPEATS, LAYER_BUDGET_S) for module, inputs, _ in calls]
        model_s = median_time(lambda: model(x), MODEL_REPEATS, MODEL_BUDGET_S)
    macs = [m for _, _, m in calls]
    intercept, rate = fit_rate(macs, times)
    total = sum(macs)
    # The whole forward takes longer than its calls timed alone (activations, pooling, additions; on a CPU quota,
    # the throttling a long run meets and a short call does not): the node's rate is the whole forward's, its MACs
    # over what the forward takes beyond the per-call overheads. Counting the rest per MAC of the node's dense
    # share instead predicted the edge rows 83% too slow (docs/results/uneven).
    beyond = model_s - len(calls) * intercept
    whole_rate = total / beyond if beyond > 0 else rate
    return Compute(min(rate, whole_rate), intercept, rate, model_s, total, len(calls))
