"""Where the tensors of the model that operations other than channel-mixing layers read go (BatchNorm's and
LayerNorm's parameters, a position embedding, an attention bias gathered from a table...): the one answer the
cost report counts and the shard writer cuts by. Channel-mixing layers' weights follow their split plans
(plan.py) instead.

Each such tensor has an owner map (propagate.py, `StaticPlacement`): stored on the node that reads each element,
whole on every node (REPLICATED) where several read it or where the reading nodes' parts are no box.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from disco.split.assignment import holds
from disco.split.layouts import varying_dims


@dataclass(frozen=True)
class Placement:
    tensor: torch.Tensor
    is_parameter: bool
    owner: torch.Tensor  # node of each element (REPLICATED: all; -2: none)

    def part(self, node: int) -> torch.Tensor:
        """What `node` stores of the tensor: the tensor narrowed along one dim to the elements it reads (empty when
        it reads none)."""
        held = holds(self.owner, node).broadcast_to(self.tensor.shape)
        dims = varying_dims(held)
        if not dims:
            if bool(held.all()):
                return self.tensor
            split = varying_dims(self.owner.broadcast_to(self.tensor.shape))  # none held: empty along the split dim
            return self.tensor.narrow(split[0] if len(split) == 1 else 0, 0, 0)
        dim = dims[0]
        line = held.movedim(dim, -1).reshape(-1, held.shape[dim])[0]
        return self.tensor.index_select(dim, line.nonzero().flatten().to(self.tensor.device))

    def elements_per_node(self, nodes: int) -> torch.Tensor:
        """[nodes] elements each node stores."""
        return torch.tensor([self.part(k).numel() for k in range(nodes)])


def placements(model: nn.Module, split) -> dict[str, Placement]:
    """{shard key: placement} of every tensor of the model an operation reads outside channel-mixing layers."""
    statics = split.analysis.statics
    values = split.static_values(model, [s.graph_node for s in statics.values()])
    return {key: Placement(values[s.graph_node], s.is_parameter, s.owner) for key, s in statics.items()}
