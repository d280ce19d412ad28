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


def input_shapes(original: nn.Module, x: torch.Tensor) -> dict[str, list[torch.Size]]:
    """{conv/linear name: the input shape of each of its calls} on x, read with forward hooks."""
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
    return shapes


def output_shapes(original: nn.Module, x: torch.Tensor) -> dict[str, torch.Size]:
    """{conv/linear name: the output shape of its first call} on x, read with forward hooks."""
    shapes = {}
    hooks = [m.register_forward_hook(lambda module, inputs, output, name=name: shapes.setdefault(name, output.shape)
                                     and None) for name, m in plain_layers(original).items()]
    with torch.no_grad():
        original(x)
    for h in hooks:
        h.remove()
    return shapes


def channels_sent(layer, nodes: int, *, masked: bool = True) -> list[list[int]]:
    """[src][dst] input channels of `layer` that src must send dst: read off its buffers channel by channel
    (masked=False: every channel dst's output rows read, whatever the group mask keeps)."""
    channels = layer.in_assign.numel()
    groups = getattr(layer, "groups", 1)
    out_per_group = layer.out_assign.numel() // groups
    readers = [set(layer.out_assign[g * out_per_group:(g + 1) * out_per_group].tolist()) for g in range(groups)]
    assign_in, mask = layer.in_assign.tolist(), layer.group_mask.tolist()
    sent = [[0] * nodes for _ in range(nodes)]
    for c in range(channels):
        src = assign_in[c]
        for k in readers[c // (channels // groups)]:
            if src >= 0 and k != src and (mask[k][c] > 0 or not masked):
                sent[src][k] += 1
    return sent


def hook_count(original: nn.Module, simulated: nn.Module, x: torch.Tensor, bytes_per_element: int):
    """[src][dst] bytes per image: every conv/linear input channel not on a destination node that uses it
    (and whose group is kept), times its spatial size, times the dtype's bytes."""
    return _hook_bytes(original, simulated, x, lambda n, values: n * values * bytes_per_element)


def hook_message_bytes(original: nn.Module, simulated: nn.Module, x: torch.Tensor, bits: int) -> list[list[int]]:
    """[src][dst] bytes per image for an integer transport of `bits` bits, as the wire format is documented
    (docs/method.md 8): one message per layer call and pair; codes packed 8 // bits per byte; a float32
    (low, step) pair per channel when a channel has at least 64 values per image, else one per message."""
    return _hook_bytes(original, simulated, x,
                       lambda n, values: (n if values >= 64 else 1) * 8 + -(-n * values * bits // 8))


def _hook_bytes(original, simulated, x, message_bytes) -> list[list[int]]:
    """[src][dst] sum over layer calls (input shapes from hooks) of message_bytes(channels sent, values each)."""
    plans = disco.disco_layers(simulated)
    nodes = next(iter(plans.values())).nodes
    matrix = [[0] * nodes for _ in range(nodes)]
    for name, calls in input_shapes(original, x).items():
        sent = channels_sent(plans[name], nodes)
        for shape in calls:
            values = shape.numel() // (shape[0] * plans[name].in_assign.numel())
            for src in range(nodes):
                for dst in range(nodes):
                    if sent[src][dst]:
                        matrix[src][dst] += message_bytes(sent[src][dst], values)
    return matrix
