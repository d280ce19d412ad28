"""Independent references for tests: hand-zeroed weights and hook-based communication counts.

These read only the plan (each layer's assignments and group mask) and the *original* model; they do
not call the partitioner's own cost or masking code.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

import disco


def plain_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))}


def hand_zeroed(original: nn.Module, simulated: nn.Module, dropped: dict | None = None) -> nn.Module:
    """The original model with every dropped group's weight slice set to zero, one output row at a time.
    `dropped`, if given, receives the number of weights zeroed per layer."""
    reference = copy.deepcopy(original)
    plans = disco.disco_layers(simulated)
    with torch.no_grad():
        for name, module in plain_layers(reference).items():
            plan = plans[name]
            groups = getattr(module, "groups", 1)
            out_per_group = module.weight.shape[0] // groups
            in_per_group = module.weight.shape[1]
            for o in range(module.weight.shape[0]):
                k = int(plan.out_assign[o])
                columns = (o // out_per_group) * in_per_group + torch.arange(in_per_group)
                source = plan.in_assign[columns]
                removed = (source >= 0) & (source != k) & (plan.group_mask[k, columns] == 0)
                module.weight[o, removed] = 0
                if dropped is not None:
                    dropped[name] = dropped.get(name, 0) + int(removed.sum()) * module.weight[0, 0].numel()
    return reference


def hook_count(original: nn.Module, simulated: nn.Module, x: torch.Tensor, bytes_per_element: int):
    """[src][dst] bytes per image: every conv/linear input channel not on a destination node that uses it
    (and whose group is kept), times its spatial size, times the dtype's bytes."""
    plans = disco.disco_layers(simulated)
    nodes = next(iter(plans.values())).nodes
    matrix = [[0] * nodes for _ in range(nodes)]
    shapes = {}

    def remember(name):
        def hook(module, inputs, output):
            shapes.setdefault(name, []).append(inputs[0].shape)  # a shared layer sends on every call
        return hook
    hooks = [m.register_forward_hook(remember(name)) for name, m in plain_layers(original).items()]
    with torch.no_grad():
        original(x)
    for h in hooks:
        h.remove()
    for name, calls in shapes.items():
        plan = plans[name]
        channels = plan.in_assign.numel()
        spatial = sum(shape.numel() // (shape[0] * channels) for shape in calls)
        groups = getattr(plan, "groups", 1)
        out_per_group = plan.out_assign.numel() // groups
        assign_in = plan.in_assign.tolist()
        mask = plan.group_mask.tolist()
        readers = [set(plan.out_assign[g * out_per_group:(g + 1) * out_per_group].tolist()) for g in range(groups)]
        for c in range(channels):
            src = assign_in[c]
            for k in readers[c // (channels // groups)]:
                if src >= 0 and k != src and mask[k][c] > 0:
                    matrix[src][k] += spatial * bytes_per_element
    return matrix
