"""The rule of channel-mixing calls (MIXING: a convolution or linear with a weight of the model): a DISCO layer,
whose output channels the balancer assigns and whose plan says what crosses the network (MixingCall). A call whose
weight is no layer's, or a linear over a dim that is not split, is a local contraction instead."""
from __future__ import annotations

import math

import torch
from torch import fx

from disco.split.analysis import MixingCall, Products
from disco.split.assignment import broadcast_channels, channel_vector
from disco.split.balance import Balancer
from disco.split.capture import calling_module
from disco.split.layouts import uniform_along
from disco.split.ops import CONVOLUTIONS
from disco.split.rules.common import arg, macs_per_node, move_to

aten = torch.ops.aten


def conv_groups(graph_node: fx.Node) -> int:
    """The groups of a convolution (1 for a linear)."""
    if graph_node.target is aten.convolution.default:
        return graph_node.args[8]
    if graph_node.target in CONVOLUTIONS:
        return arg(graph_node, 6, "groups", 1)
    return 1


def mixing(p, graph_node: fx.Node, value):
    conv = graph_node.target in CONVOLUTIONS
    x, weight = graph_node.args[0], graph_node.args[1]
    bias = arg(graph_node, 2, "bias")
    if graph_node.target is aten.convolution.default and graph_node.args[6]:
        return None  # transposed convolution: the fallback runs it
    if weight not in p.static or (isinstance(bias, fx.Node) and bias not in p.static) or x in p.static:
        return None
    channel_dim = 1 if conv else -1
    own = p.owner_of(x)
    layer = p.layer_of(weight)
    vector = channel_vector(own, channel_dim)
    if layer is None or (vector is None and not conv and uniform_along(own, [own.dim() - 1]) is not None):
        return _local_contraction(p, graph_node, value, own,
                                  [own.dim() - 1] if not conv else list(range(1, own.dim())))
    first = p.first_inputs.get(layer)
    if vector is None or (first is not None and not torch.equal(vector, first)):
        vector = first if first is not None else Balancer(p.nodes, p.node_weights).proportional(
            own.shape[channel_dim]).float()
        move_to(p, graph_node, x, broadcast_channels(vector, own.shape, channel_dim).float(),
                "a layer reads its channels along another dim than they are split")
        vector = vector.long()
    p.first_inputs.setdefault(layer, vector)
    groups = conv_groups(graph_node)
    out_assign = p.choose_output(layer, p.model.get_submodule(layer), vector, value.shape, groups)
    call = MixingCall(layer, graph_node.name, vector, out_assign, own.shape, value.shape, p.index_of(graph_node),
                      channel_dim, groups, weight.name, bias.name if isinstance(bias, fx.Node) else "",
                      calling_module(graph_node))
    p.record(call)
    p.layer_outputs[graph_node] = call
    return broadcast_channels(out_assign, value.shape, channel_dim)


def _local_contraction(p, graph_node, value, own, contracted):
    """A conv/linear whose weight is no layer's, or a linear over a dim that is not split (MLP-Mixer's token mixing):
    local wherever the contracted dims are held by one node."""
    line = uniform_along(own, contracted)
    if line is None:
        return None
    result = line.expand(value.shape)
    p.record(Products(graph_node.name, macs_per_node(p, result, math.prod(graph_node.args[1].meta["val"].shape[1:]))))
    return result
