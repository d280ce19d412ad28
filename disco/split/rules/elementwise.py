"""Rules of operations that work element by element (POINTWISE) or make a tensor from sizes alone (CREATE)."""
from __future__ import annotations

import torch
from torch import fx

from disco.split.layouts import needs, replicated
from disco.split.rules.common import move_to, shaped_like, tensors


def pointwise(p, graph_node: fx.Node, value):
    """Each result element lives where its operands' elements at its (broadcast) position live: operands whose
    owners disagree are made to agree (a layer re-assigned if one can be, else the data moved)."""
    shape = tensors(value)[0].shape
    combined, first = None, None
    for a in p.tensor_operands(graph_node):
        if a in p.static:
            continue
        own = p.owner_of(a).broadcast_to(shape)
        if combined is None:
            combined, first = own, a
            continue
        conflict = (combined != own) & (combined >= 0) & (own >= 0)
        if bool(conflict.any()):
            wanted = torch.where(combined >= 0, combined, own)
            if not p.pullback(a, needs(p.shape_of(a), wanted)) and \
                    not p.pullback(first, needs(p.shape_of(first), torch.where(own >= 0, own, combined))):
                own = move_to(p, graph_node, a, needs(p.shape_of(a), wanted), "its operands' channels live on "
                              "different nodes").broadcast_to(shape)
        combined = torch.where(combined >= 0, combined, own)
    return shaped_like(value, [combined for _ in tensors(value)])


def create(p, graph_node: fx.Node, value):
    """A new tensor from sizes alone (arange, full): every node makes it."""
    return shaped_like(value, [replicated(t.shape) for t in tensors(value)])
