"""The rules of products between activations: a contraction (CONTRACT: mm, bmm, addmm, matmul) is local when the
contracted dim does not span nodes, and scaled dot-product attention (ATTENTION) when q, k and v of a head sit on
one node; else their operands are moved so that they do. Both record each node's MACs (Products)."""
from __future__ import annotations

import torch
from torch import fx

from disco.split.analysis import Products
from disco.split.balance import Balancer
from disco.split.layouts import majority_along, needs, uniform_along
from disco.split.ops import BIASED_CONTRACTIONS
from disco.split.rules.common import arg, macs_per_node, move_to


def contract(p, graph_node: fx.Node, value):
    bias = None
    if graph_node.target in BIASED_CONTRACTIONS:
        bias, a, b = graph_node.args[0], graph_node.args[1], graph_node.args[2]
    else:
        a, b = graph_node.args[0], graph_node.args[1]
    ao, bo = p.owner_of(a), p.owner_of(b)
    if ao.dim() < 2 or bo.dim() < 2:
        return None
    result = _aligned_product(ao, bo, value)
    if result is None:
        if value.dim() < 3 or ao.dim() < 3 or bo.dim() < 3 or a in p.static or b in p.static:
            return None
        result = _batched_product(p, graph_node, a, b, value)
    if isinstance(bias, fx.Node) and bias not in p.static and \
            not torch.equal(p.owner_of(bias).broadcast_to(result.shape), result):
        move_to(p, graph_node, bias, needs(p.shape_of(bias), result), "a product's bias lives elsewhere")
    p.record(Products(graph_node.name, macs_per_node(p, result, ao.shape[-1])))
    return result


def _aligned_product(ao: torch.Tensor, bo: torch.Tensor, value) -> torch.Tensor | None:
    """The result's owners when a's rows and b's columns are each held whole by one node, and those agree."""
    a_line, b_line = uniform_along(ao, [ao.dim() - 1]), uniform_along(bo, [bo.dim() - 2])
    if a_line is None or b_line is None:
        return None
    left, right = a_line.broadcast_to(value.shape), b_line.broadcast_to(value.shape)
    if bool(((left != right) & (left >= 0) & (right >= 0)).any()):
        return None
    return torch.where(left >= 0, left, right)


def _batched_product(p, graph_node: fx.Node, a: fx.Node, b: fx.Node, value) -> torch.Tensor:
    """Each matrix of a batched product computed whole on the node holding most of a's matrix (operands moved)."""
    ao, bo = p.owner_of(a), p.owner_of(b)
    lead = majority_along(ao, [ao.dim() - 2, ao.dim() - 1], p.nodes)
    move_to(p, graph_node, a, lead.expand(ao.shape), "a product reads elements held on several nodes")
    # b's batch dims may broadcast against a's (a lambda layer's one position matrix for every head): each of
    # its matrices goes to every node whose products read it
    b_lead = needs((*bo.shape[:-2], 1, 1), lead.broadcast_to((*value.shape[:-2], 1, 1)))
    move_to(p, graph_node, b, b_lead.expand(bo.shape), "a product reads elements held on several nodes")
    return lead.broadcast_to((*value.shape[:-2], 1, 1)).expand(value.shape)


def attention(p, graph_node: fx.Node, value):
    q, k, v = graph_node.args[0], graph_node.args[1], graph_node.args[2]
    mask = arg(graph_node, 3, "attn_mask")
    if arg(graph_node, 7, "enable_gqa", False) or any(a in p.static for a in (q, k, v)):
        return None
    owners = [p.owner_of(a) for a in (q, k, v)]
    lead_shape = value.shape[:-2]
    heads = _shared_heads(owners, lead_shape)
    if heads is None:
        heads = _spread_heads(p, owners, value)
        for a, o in zip((q, k, v), owners):
            move_to(p, graph_node, a, heads.broadcast_to((*o.shape[:-2], 1, 1)).expand(o.shape),
                    "q, k and v of an attention head must sit on one node")
    result = heads.expand(value.shape)
    if isinstance(mask, fx.Node) and mask not in p.static:
        scores = heads.expand((*lead_shape, value.shape[-2], owners[1].shape[-2]))
        move_to(p, graph_node, mask, needs(p.shape_of(mask), scores), "an attention mask lives elsewhere")
    tokens, keys = value.shape[-2], owners[1].shape[-2]
    per_head = tokens * keys * (owners[0].shape[-1] + owners[2].shape[-1])
    p.record(Products(graph_node.name, macs_per_node(p, heads, per_head)))
    return result


def _shared_heads(owners: list[torch.Tensor], lead_shape) -> torch.Tensor | None:
    """The node of each head when q, k and v each hold every head whole, on the same node; else None."""
    lines = [uniform_along(o, [o.dim() - 2, o.dim() - 1]) for o in owners]
    if any(line is None for line in lines):
        return None
    heads = [line.broadcast_to((*lead_shape, 1, 1)) for line in lines]
    return heads[0] if all(torch.equal(h, heads[0]) for h in heads) else None


def _spread_heads(p, owners: list[torch.Tensor], value) -> torch.Tensor:
    """Where each head goes when q, k and v disagree: heads spread in proportion to the nodes' weights, or (one
    head) the node holding most of q's matrix."""
    if value.dim() >= 3 and value.shape[-3] > 1:
        per_head = Balancer(p.nodes, p.node_weights).proportional(value.shape[-3]).float().reshape(-1, 1, 1)
        return per_head.expand((*value.shape[:-2], 1, 1))
    return majority_along(owners[0], [owners[0].dim() - 2, owners[0].dim() - 1], p.nodes)
