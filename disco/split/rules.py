"""What each operation does to channel ownership, by kind. Unknown operations are refused.

Kinds:
- ELEMENTWISE: output element depends on the input elements at the same (broadcast) position.
- SPATIAL: works within each channel over spatial dims (pooling, interpolation); channels on dim 1, or on
  the module's `disco_channel_dim`.
- MOVE: pure data movement (view, cat, permute, getitem...): followed exactly on owner maps.
- REDUCE: reduction over given dims; allowed when those dims do not span nodes.
- MIXING: channel-mixing layers (see layers.MIXING_LAYERS); these carry communication groups.
- NORM: LayerNorm over the last (channel) dim; nodes exchange two partial sums per position.
- ATTENTION: scaled_dot_product_attention with heads on dim 1, or Swin's WindowAttention (channels last);
  heads must be whole on one node.
"""
from __future__ import annotations

import operator
from enum import Enum

import torch
from torch import fx, nn
from torch.nn import functional as F

from torchvision.models.swin_transformer import _patch_merging_pad
from torchvision.ops.misc import Permute
from torchvision.ops import stochastic_depth

from disco.split.layers import mixing_kind
from disco.split.window_attention import WindowAttention, WindowCrop, WindowPad


class OpKind(Enum):
    ELEMENTWISE = "elementwise"
    SPATIAL = "spatial"
    MOVE = "move"
    REDUCE = "reduce"
    MIXING = "mixing"
    NORM = "norm"  # normalises over channels that may span nodes: partial sums are exchanged
    ATTENTION = "attention"  # softmax(QK^T)V per head: local when heads are whole on one node


_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU,
    nn.ELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.PReLU, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm,
)
_SPATIAL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
    nn.ZeroPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d, WindowPad, WindowCrop,  # the last two: channels last
)
_MOVE_MODULES = (nn.Flatten, nn.Unflatten, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle, Permute)

# Modules whose parameters are one value per channel on dim 1 (counted on the channel's node).
PER_CHANNEL_PARAM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm, nn.PReLU)

_ELEMENTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, operator.neg, operator.pow,
    torch.add, torch.sub, torch.mul, torch.div, torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.exp,
    torch.clamp, torch.sqrt, torch.neg, torch.abs,
    F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.hardtanh, F.leaky_relu, F.elu, F.mish,
    F.softplus, F.sigmoid, F.tanh, F.dropout, F.dropout2d,
    stochastic_depth,  # zeroes whole samples (rows) at random in training: never mixes channels
}
_SPATIAL_FUNCTIONS = {
    F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.avg_pool2d, F.max_pool2d, F.adaptive_avg_pool1d,
    F.avg_pool1d, F.max_pool1d, F.interpolate, F.pad, torch.nn.functional.upsample,
}
_MOVE_FUNCTIONS = {
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.cat, torch.concat, torch.stack,
    torch.chunk, torch.split, torch.squeeze, torch.unsqueeze, torch.narrow, operator.getitem,
    F.pixel_shuffle, F.pixel_unshuffle, torch.channel_shuffle,
    _patch_merging_pad,  # Swin's patch merging: strided slices of [..., H, W, C] concatenated on C
}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}

_ELEMENTWISE_METHODS = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "relu", "relu_", "sigmoid", "sigmoid_",
    "tanh", "clamp", "clamp_", "clamp_min", "exp", "pow", "neg", "sqrt", "abs", "float", "to", "type_as",
    "hardtanh_", "detach",
}
_MOVE_METHODS = {
    "view", "reshape", "flatten", "permute", "transpose", "contiguous", "chunk", "split", "squeeze",
    "unsqueeze", "narrow", "unflatten", "clone", "expand",
}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}


def kind_of_module(module: nn.Module) -> OpKind | None:
    if mixing_kind(module) is not None:
        return OpKind.MIXING
    if isinstance(module, nn.LayerNorm):
        return OpKind.NORM
    if isinstance(module, WindowAttention):
        return OpKind.ATTENTION
    if isinstance(module, _ELEMENTWISE_MODULES):
        return OpKind.ELEMENTWISE
    if isinstance(module, _SPATIAL_MODULES):
        return OpKind.SPATIAL
    if isinstance(module, _MOVE_MODULES):
        return OpKind.MOVE
    return None


def kind_of_function(target) -> OpKind | None:
    if target is F.scaled_dot_product_attention:
        return OpKind.ATTENTION
    for kind, table in ((OpKind.ELEMENTWISE, _ELEMENTWISE_FUNCTIONS), (OpKind.SPATIAL, _SPATIAL_FUNCTIONS),
                        (OpKind.MOVE, _MOVE_FUNCTIONS), (OpKind.REDUCE, _REDUCE_FUNCTIONS)):
        if target in table:
            return kind
    return None


def kind_of_method(name: str) -> OpKind | None:
    for kind, table in ((OpKind.ELEMENTWISE, _ELEMENTWISE_METHODS), (OpKind.MOVE, _MOVE_METHODS),
                        (OpKind.REDUCE, _REDUCE_METHODS)):
        if name in table:
            return kind
    return None


def kind_of_node(node: fx.Node, module: nn.Module | None) -> OpKind | None:
    """The kind of a graph node's operation (`module`: the called module of a call_module node)."""
    if node.op == "call_module":
        return kind_of_module(module)
    if node.op == "call_function":
        return kind_of_function(node.target)
    return kind_of_method(node.target)


def call_node(node: fx.Node, module: nn.Module | None, args: tuple, kwargs: dict):
    """Run a graph node's operation on any values (real tensors, owner maps, element ids)."""
    if node.op == "call_module":
        return module(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)
