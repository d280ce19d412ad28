"""The steps of a rank's program: one per graph node, all with the same interface, `run(env, comm)`, which
reads the node's operands from `env` (graph node -> this rank's value) and returns the node's value.

Steps that talk to other ranks (channel-mixing layers, norms over split channels) do it through `comm`; the
others are local. Which step a node becomes is decided once, when the program is built (program.py)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from disco.runtime.comm import Comm
from disco.runtime.layout import Gather, NarrowOperands
from disco.split.rules import call_node

INPUT, BATCH = "input", "batch"  # env keys besides graph nodes: the rank's input and the batch size


@dataclass
class Step:
    node: fx.Node

    def run(self, env: dict, comm: Comm):
        raise NotImplementedError


@dataclass
class Input(Step):
    def run(self, env: dict, comm: Comm):
        return env[INPUT]


@dataclass
class Constant(Step):
    """A tensor the graph reads directly (get_attr): this rank's part, from its shard."""

    value: torch.Tensor

    def run(self, env: dict, comm: Comm):
        return self.value


@dataclass
class ShapeQuery(Step):
    """size()/dim()/.shape answered for the whole (global) tensor, not the rank's slice."""

    global_shape: torch.Size  # of the queried value; its first dim is taken from the rank's value

    def run(self, env: dict, comm: Comm):
        shape = torch.Size([env[self.node.args[0]].shape[0], *self.global_shape[1:]])
        if self.node.op == "call_function":
            return shape
        if self.node.target == "dim":
            return len(shape)
        args = fx.node.map_arg(self.node.args[1:], lambda a: env[a])
        return shape[args[0]] if args else shape


@dataclass
class Local(Step):
    """An operation run unchanged on the rank's values: a function, a method, or a module holding this
    rank's parameters. `narrow` cuts operands held more widely than the result (see layout.NarrowOperands)."""

    module: nn.Module | None = None
    narrow: NarrowOperands | None = None

    def run(self, env: dict, comm: Comm):
        value_of = (lambda a: self.narrow.cut(a, env[a])) if self.narrow is not None else (lambda a: env[a])
        args = fx.node.map_arg(self.node.args, value_of)
        kwargs = fx.node.map_arg(self.node.kwargs, value_of)
        return call_node(self.node, self.module, args, kwargs)


@dataclass
class Nothing(Step):
    """A node of which this rank holds no element (it owns none of the value's channels, e.g. 9 nodes on an
    8-channel layer): an empty tensor of the rank's local shape, without calling an operation that may refuse
    empty input (BatchNorm does)."""

    local_shape: tuple[int, ...]  # per image, as layout.local_shape gives it

    def run(self, env: dict, comm: Comm):
        operands = [env[a] for a in self.node.all_input_nodes if isinstance(env.get(a), torch.Tensor)]
        like = operands[0] if operands else env[INPUT]
        return like.new_empty((env[BATCH], *self.local_shape[1:]))


@dataclass
class Move(Step):
    """Data movement (view, cat, getitem...) as one gather of the rank's held elements."""

    gather: Gather

    def run(self, env: dict, comm: Comm):
        return self.gather(env[BATCH], *[env[source] for source in self.gather.sources])


@dataclass
class Exchanging(Step):
    """A step that exchanges data with other ranks on its first operand: a channel-mixing layer (mixing.py) or a
    norm over split channels (norm.py)."""

    call: object  # (x, comm) -> value

    def run(self, env: dict, comm: Comm):
        return self.call(env[self.node.args[0]], comm)
