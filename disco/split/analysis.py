"""What following channel ownership through a captured graph finds (propagate.py): the records the plans, the
cost report, the shard writer and the runtime read. All counts are per image. A record's `graph_node` field is
the name of its graph node."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class MixingCall:
    """One call of a channel-mixing layer (a conv or linear with a weight of the model)."""

    module: str  # the layer: the module that owns the weight
    graph_node: str  # the graph node's name
    in_assign: torch.Tensor
    out_assign: torch.Tensor
    in_shape: torch.Size  # per image
    out_shape: torch.Size
    index: int  # position in graph order
    channel_dim: int = 1  # dim of channels in its input and output (conv 1, linear -1)
    conv_groups: int = 1
    weight: str = ""  # the graph node of the weight as the call reads it (a parameter, or computed from one)
    bias: str = ""  # the graph node of its bias as the call reads it ("" without one)
    caller: str | None = None  # the module whose forward makes the call (`module`, or an ancestor computing it)


@dataclass
class ValueRecord:
    """Elements of one activation held by each node (replicated data counts on every node)."""

    index: int  # position in graph order
    graph_node: str  # the graph node's name
    elements_per_node: list[int]
    element_size: int
    last_use: int


@dataclass
class Exchange:
    """Partial results of a norm or reduction over dims whose elements span nodes: `values[src][dst]` fp32
    numbers per image that src sends dst (docs/method.md 3)."""

    graph_node: str  # the graph node's name
    op: str
    kind: str  # layer_norm, group_norm, sum, mean, max, min, prod, var
    values: torch.Tensor


@dataclass
class Redistribution:
    """A value moved to another layout before (`operand` = its position among the operation's tensor operands)
    or after (`operand` None) an operation: the general fallback's gather and re-split, and the layout changes
    that let an operation run where its result lives."""

    graph_node: str  # the graph node's name
    operand: int | None
    target: torch.Tensor  # owner map after the move
    elements: torch.Tensor  # [src, dst] elements moved per image
    element_size: int
    reason: str


@dataclass
class Fallback:
    """An operation run whole on one node because no rule splits it (`reason`)."""

    graph_node: str  # the graph node's name
    op: str
    executor: int
    reason: str
    macs: int = 0


@dataclass
class Products:
    """Multiply-accumulates of a product between activations (attention's QK^T and AV, a contraction): local to
    the node that holds each output element."""

    graph_node: str  # the graph node's name
    macs_per_node: list[int]


@dataclass
class StaticPlacement:
    """A tensor computed from the model's own parameters, buffers or constants alone that an operation on
    activations reads (a norm's weight, a position embedding, an attention bias gathered from a table): `owner`
    says which node stores each element (REPLICATED: every node; -2: none)."""

    key: str  # shard key: the parameter's name, or `static.NODE` for a computed one
    graph_node: str  # the graph node's name
    owner: torch.Tensor
    is_parameter: bool  # counted as parameter bytes (reads a parameter)
    element_size: int
    index: bool = False  # read as indices by a data movement: stored whole on every node


@dataclass
class GraphAnalysis:
    nodes: int
    batch: int
    mixing: list[MixingCall] = field(default_factory=list)
    values: list[ValueRecord] = field(default_factory=list)
    input_elements: int = 0
    output_elements: int = 0
    output_elements_per_node: list[int] = field(default_factory=list)
    exchanges: list[Exchange] = field(default_factory=list)
    redistributions: list[Redistribution] = field(default_factory=list)
    fallbacks: list[Fallback] = field(default_factory=list)
    products: list[Products] = field(default_factory=list)
    statics: dict[str, StaticPlacement] = field(default_factory=dict)
