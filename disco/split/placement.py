"""Where the parameters and buffers of the modules around the channel-mixing layers go (BatchNorm, LayerNorm,
per-head tables, class tokens...): the one answer that the cost report counts and the shard writer cuts by.
Channel-mixing layers' weights follow their split plan (plan.py) instead.

A tensor goes whole to every node (not split by channel: shared scalars, replicated parameters), by channel
(entry i along `dim` goes to the node of channel i: BatchNorm's per-channel vectors, a position embedding
split like the tokens it meets), or as its module splits it (`split_parameters(channels, node)`, e.g. Swin's
per-head relative-position bias table).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import torch
from torch import nn

from disco.split.propagate import GraphAnalysis


@dataclass(frozen=True)
class Placement:
    tensor: torch.Tensor
    is_parameter: bool
    channels: torch.Tensor | None = None  # node of each index along `dim`; None: whole on every node
    dim: int = 0
    module: nn.Module | None = None  # splits the tensor itself (key `key`)
    key: str = ""

    def part(self, node: int) -> torch.Tensor:
        """What `node` holds of the tensor."""
        if self.module is not None:
            return self.module.split_parameters(self.channels, node)[self.key]
        if self.channels is None:
            return self.tensor
        return self.tensor.index_select(self.dim, (self.channels == node).nonzero().flatten().to(self.tensor.device))

    def elements_per_node(self, nodes: int) -> torch.Tensor:
        """[nodes] elements each node holds."""
        if self.module is not None:
            return torch.tensor([self.part(k).numel() for k in range(nodes)])
        if self.channels is None:
            return torch.full((nodes,), self.tensor.numel())
        per_index = self.tensor.numel() // self.channels.numel()
        return torch.bincount(self.channels.cpu(), minlength=nodes) * per_index


def _attribute(model: nn.Module, target: str) -> torch.Tensor:
    owner, _, attr = target.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, attr)


def placements(model: nn.Module, analysis: GraphAnalysis) -> dict[str, Placement]:
    """{qualified name: placement} of every parameter and buffer the graph reads outside mixing layers."""
    found = {}
    for name, channels in analysis.channel_owner_of_module.items():
        module = model.get_submodule(name)
        splits_itself = channels is not None and hasattr(module, "split_parameters")
        for key, tensor in chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False)):
            qualified = f"{name}.{key}" if name else key
            is_parameter = isinstance(tensor, nn.Parameter)
            if splits_itself:
                found[qualified] = Placement(tensor, is_parameter, channels, module=module, key=key)
            elif channels is not None and tensor.dim() == 1 and tensor.numel() == channels.numel():
                found[qualified] = Placement(tensor, is_parameter, channels)
            else:
                found[qualified] = Placement(tensor, is_parameter)
    for target in analysis.replicated_attributes:
        tensor = _attribute(model, target)
        found[target] = Placement(tensor, isinstance(tensor, nn.Parameter))
    for target, (channels, dim) in analysis.attribute_channels.items():
        tensor = _attribute(model, target)
        found[target] = Placement(tensor, isinstance(tensor, nn.Parameter), channels, dim)
    return found
