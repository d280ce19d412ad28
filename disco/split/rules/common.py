"""What every rule family uses: a (possibly multi-output) value's tensors and owner maps in its structure, an
operation's arguments by position or name, the one way a rule changes an operand's layout, and MACs per node."""
from __future__ import annotations

import torch
from torch import fx
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from disco.split.assignment import holds


def tensors(value) -> list[torch.Tensor]:
    """The tensors of a value, in its flattened order (one for a plain tensor, several for a multi-output op)."""
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


def shaped_like(value, owners: list[torch.Tensor]):
    """Owner maps in the structure of a (possibly multi-output) value."""
    leaves, spec = tree_flatten(value)
    it = iter(owners)
    return tree_unflatten([next(it) if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves], spec)


def arg(graph_node: fx.Node, position: int, name: str, default=None):
    """An argument of the operation, given by position or by keyword."""
    return graph_node.kwargs.get(name, graph_node.args[position] if len(graph_node.args) > position else default)


def move_to(p, graph_node: fx.Node, operand: fx.Node, target: torch.Tensor, reason: str) -> torch.Tensor:
    """Give an operand layout `target`: re-assign its layer if it can be, else move it (counted)."""
    current = p.owner_of(operand)
    if torch.equal(current.broadcast_to(target.shape), target):
        return target
    if not p.pullback(operand, target):
        p.change_operand(graph_node, p.tensor_operands(graph_node).index(operand), target, reason)
    return target


def macs_per_node(p, owner: torch.Tensor, macs_per_element: int) -> list[int]:
    """The MACs each node does when it computes the result elements `owner` gives it (replicated: every node)."""
    return [int(holds(owner, k).sum()) * macs_per_element for k in range(p.nodes)]
