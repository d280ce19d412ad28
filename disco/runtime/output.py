"""The model's output across ranks: which of its elements each rank sends rank 0, and rank 0's assembly of them
into the whole output (protocol.gather_output moves the parts)."""
from __future__ import annotations

import torch
from torch import fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from disco.runtime.layout import Layout
from disco.runtime.rank_graph import RankGraph
from disco.split.assignment import REPLICATED, holds
from disco.split.capture import batch_axis


class OutputLayout:
    """Computed once per program: the output's owner maps, and which per-image flat positions each rank sends
    (rank 0: every element it holds; the others: only their own)."""

    def __init__(self, rank_graph: RankGraph, output_graph_node: fx.Node, out_spec):
        self.rank, self.output_graph_node, self.out_spec = rank_graph.rank, output_graph_node, out_spec
        leaves = tree_flatten(output_graph_node.args[0])[0]
        graph_nodes = [leaf for leaf in leaves if isinstance(leaf, fx.Node)]
        self.owners = [rank_graph.owner(graph_node) for graph_node in graph_nodes]
        self.axes = [batch_axis(graph_node) for graph_node in graph_nodes]
        self.positions = [[(holds(o, rank) if rank == 0 else (o == rank)).flatten().nonzero().flatten()
                           for o in self.owners] for rank in range(rank_graph.nodes)]
        # a rank other than 0 holds replicated output elements too, but sends only its own ones
        self.own_in_held = [(o == self.rank).flatten()[holds(o, self.rank).flatten()].nonzero().flatten()
                            .to(rank_graph.device) for o in self.owners]
        self.layouts = [rank_graph.layout(o, axis) for o, axis in zip(self.owners, self.axes)]

    def elements(self, rank: int) -> int:
        """Per image, how many output elements `rank` sends rank 0."""
        return sum(p.numel() for p in self.positions[rank])

    def part(self, local) -> torch.Tensor:
        """[batch, elements] this rank contributes to the output: its own elements (not replicated ones)."""
        leaves = [t for t in tree_flatten(local)[0] if isinstance(t, torch.Tensor)]
        parts = []
        for leaf, own, layout in zip(leaves, self.own_in_held, self.layouts):
            axis = layout.axis
            batch = leaf.shape[axis.dim] // axis.per_image if axis is not None else 1
            rows = layout.rows(leaf, batch)
            parts.append(rows if self.rank == 0 else rows[:, own])
        return torch.cat(parts, dim=1)

    def assemble(self, parts: dict[int, torch.Tensor]):
        """On rank 0: the whole output from every rank's `part`, in the model's output structure."""
        batch = parts[0].shape[0]
        wholes = [torch.zeros((batch, o.numel()), dtype=parts[0].dtype, device=parts[0].device) for o in self.owners]
        for rank, part in parts.items():
            start = 0
            for whole, positions in zip(wholes, self.positions[rank]):
                whole[:, positions.to(whole.device)] = part[:, start:start + positions.numel()].to(whole.dtype)
                start += positions.numel()
        shaped = [Layout.of(torch.full(tuple(o.shape), float(REPLICATED)), 0, axis).tensor(w, batch)
                  for w, o, axis in zip(wholes, self.owners, self.axes)]
        leaves = iter(shaped)
        flat = [next(leaves) if isinstance(leaf, fx.Node) else leaf
                for leaf in tree_flatten(self.output_graph_node.args[0])[0]]
        return tree_unflatten(flat, self.out_spec) if self.out_spec is not None else flat
