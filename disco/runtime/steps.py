"""The steps of a rank's program: one per graph node, all with the same interface, `run(env, comm)`, which reads
the graph node's operands from `env` (graph node -> this rank's value) and returns the graph node's value.

Steps that talk to other ranks (channel-mixing layers, norms and reductions over split elements, data moved to
another layout) do it through `comm`; the others are local. Which step a graph node becomes is decided once,
when the program is built (step_builder.py)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from disco.runtime.comm import Comm
from disco.runtime.layout import Gather, Layout, Narrowing, Redistribution

INPUT, BATCH = "input", "batch"  # env keys besides graph nodes: the rank's input and the batch size


@dataclass
class Step:
    graph_node: fx.Node

    def run(self, env: dict, comm: Comm):
        raise NotImplementedError


@dataclass
class Input(Step):
    def run(self, env: dict, comm: Comm):
        return env[INPUT]


@dataclass
class Constant(Step):
    """A tensor computed from the model's own parameters alone (a norm's weight, a position embedding): this
    rank's part, from its shard."""

    value: torch.Tensor

    def run(self, env: dict, comm: Comm):
        return self.value


@dataclass
class Operands:
    """A graph node's operands as this rank runs it: moved to another layout first (`moves`, by position among
    its tensor operands) or cut to what its result needs (`narrowings`)."""

    graph_node: fx.Node
    positions: list[int]  # leaf index (in the flattened args, kwargs) of each tensor operand
    moves: dict[int, Redistribution] = field(default_factory=dict)
    narrowings: dict[int, Narrowing] = field(default_factory=dict)

    @classmethod
    def of(cls, graph_node: fx.Node, tensor_operands: list[fx.Node]) -> "Operands":
        leaves = tree_flatten((graph_node.args, graph_node.kwargs))[0]
        positions, remaining = [], list(tensor_operands)
        for index, leaf in enumerate(leaves):
            if remaining and leaf is remaining[0]:
                positions.append(index)
                remaining.pop(0)
        return cls(graph_node, positions)

    def fetch(self, env: dict, comm: Comm):
        leaves, spec = tree_flatten((self.graph_node.args, self.graph_node.kwargs))
        values = [env[leaf] if isinstance(leaf, fx.Node) else leaf for leaf in leaves]
        for operand, index in enumerate(self.positions):
            if operand in self.moves:
                values[index] = self.moves[operand](values[index], env[BATCH], comm)
            if operand in self.narrowings:
                values[index] = self.narrowings[operand](values[index])
        return tree_unflatten(values, spec)

    def value(self, env: dict, comm: Comm, operand: int) -> torch.Tensor:
        """One tensor operand as the operation sees it."""
        leaves = tree_flatten((self.graph_node.args, self.graph_node.kwargs))[0]
        value = env[leaves[self.positions[operand]]]
        if operand in self.moves:
            value = self.moves[operand](value, env[BATCH], comm)
        if operand in self.narrowings:
            value = self.narrowings[operand](value)
        return value


@dataclass
class Local(Step):
    """An operation run unchanged on the rank's values (or on one rank, its operands gathered there)."""

    operands: Operands

    def run(self, env: dict, comm: Comm):
        args, kwargs = self.operands.fetch(env, comm)
        return self.graph_node.target(*args, **kwargs)


@dataclass
class NothingHeld(Step):
    """A graph node's value of which this rank holds no element (it owns none of its channels, or another rank
    runs it): empty tensors of the rank's local shapes, without calling an operation that may refuse empty input.
    The moves of its operands still run: this rank may have to send its part."""

    operands: Operands
    layouts: list[Layout]
    dtypes: list[torch.dtype]
    template: list = field(default_factory=list)
    spec: object = None

    def run(self, env: dict, comm: Comm):
        if self.operands.moves:
            self.operands.fetch(env, comm)
        device = env[INPUT].device
        empties = iter([layout.empty(env[BATCH], dtype, device) for layout, dtype in zip(self.layouts, self.dtypes)])
        return tree_unflatten([next(empties) if isinstance(t, torch.Tensor) else t for t in self.template], self.spec)


@dataclass
class Move(Step):
    """Data movement (view, cat, getitem...) as one gather of the rank's held elements."""

    operands: Operands
    gather: Gather
    sources: list[int]  # operand index of each gather source

    def run(self, env: dict, comm: Comm):
        args, kwargs = self.operands.fetch(env, comm)
        leaves = [leaf for leaf in tree_flatten((args, kwargs))[0]]
        values = [leaves[self.operands.positions[i]] for i in self.sources]
        return self.gather(env[BATCH], values)


@dataclass
class NativeMove(Step):
    """Data movement run as itself on the rank's value (checked, when built, to pick what a gather would)."""

    operands: Operands
    call: object  # (x, args, kwargs, batch) -> value

    def run(self, env: dict, comm: Comm):
        args, kwargs = self.operands.fetch(env, comm)
        return self.call(args[0], args, kwargs, env[BATCH])


@dataclass
class Exchanging(Step):
    """A step that exchanges data with other ranks on its first operand: a channel-mixing layer (mixing.py)."""

    operands: Operands
    call: object  # (x, comm) -> value

    def run(self, env: dict, comm: Comm):
        return self.call(self.operands.value(env, comm, 0), comm)


@dataclass
class Reducing(Step):
    """A norm or reduction over elements that span ranks (norm.py): `call(comm, x, *params)`."""

    operands: Operands
    call: object
    params: list[int]  # operand indices of the norm's weight and bias (absent: None)
    batch_args: bool = False  # a reduction: call(comm, x, batch, dtype)

    def run(self, env: dict, comm: Comm):
        args, kwargs = self.operands.fetch(env, comm)
        leaves = tree_flatten((args, kwargs))[0]
        x = leaves[self.operands.positions[0]]
        if self.batch_args:
            return self.call(comm, x, env[BATCH], self.graph_node.meta["val"].dtype)
        params = [leaves[self.operands.positions[i]] if i is not None else None for i in self.params]
        return self.call(comm, x, *params)


@dataclass
class Resplit(Step):
    """Another step whose result is then moved to another layout (a fallback's result split again)."""

    inner: Step
    move: Redistribution

    def run(self, env: dict, comm: Comm):
        return self.move(self.inner.run(env, comm), env[BATCH], comm)
