"""Bytes per communication group: what dropping each (input channel -> node) group saves per image."""
from __future__ import annotations

import torch
from torch import nn

from disco.accounting.layer_cost import elements_per_channel
from disco.transport import get_transport_dtype
from disco.split.partitioner import disco_layers, model_split


def group_bytes(model: nn.Module, example_inputs, transport_dtype: str = "fp32") -> dict[str, torch.Tensor]:
    """{layer name: [nodes, in_channels] bytes per image} (0 where a group does not exist): the transport dtype's
    price of one more channel in a message (disco/transport.py: TransportDtype.channel_bytes).

    A layer called several times sends its channels once per call, so the calls add up.
    """
    dtype = get_transport_dtype(transport_dtype)
    layers = disco_layers(model)
    analysis = model_split(model, example_inputs).analysis
    costs = {name: torch.zeros(layer.group_mask.shape) for name, layer in layers.items()}
    for call in analysis.mixing:
        layer = layers[call.module]
        per_channel = elements_per_channel(call.in_shape, layer.in_assign.numel(), analysis.batch)
        costs[call.module] += layer.plan.possible_groups().cpu().float() * dtype.channel_bytes(per_channel)
    return costs
