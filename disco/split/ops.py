"""The rule of every operation of a captured graph (core ATen, plus the few ops capture keeps whole).

A rule says what an operation does to channel ownership (docs/method.md 3); `disco/split/rules/` has one
function per rule. Core ATen is a closed set of about 190 operations, and most of them are classified by their
own tags (`pointwise`, `reduction`); the lists below name the rest. Every operation without a rule, and every
one whose operands' layout a rule cannot split, takes the one general fallback: its operands are gathered on one
node, it runs there, and its result is split again (FALLBACK).

`register_op_rule(op, rule)` (also `disco.register_op_rule`) teaches DISCO an operation of your own (a custom op,
or one outside core ATen).
"""
from __future__ import annotations

import operator
import re
from enum import Enum

import torch
from torch import fx
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten


class Rule(Enum):
    POINTWISE = "pointwise"  # each output element reads the operands' elements at its (broadcast) position
    MOVE = "move"  # output elements are copies of input elements, or constants (view, cat, index with constants)
    WINDOW = "window"  # works along some dims, independently along the others (pooling, softmax, cumsum)
    REDUCE = "reduce"  # reduces dims: local when they do not span nodes, else partial results are exchanged
    NORM = "norm"  # normalises over dims (LayerNorm, GroupNorm; BatchNorm over none): partial sums when spanning
    MIXING = "mixing"  # convolution or linear with a weight of the model: a DISCO layer
    CONTRACT = "contract"  # mm/bmm/addmm between activations: local when the contracted dim does not span nodes
    ATTENTION = "attention"  # scaled dot-product attention: local when q, k, v of a head sit on one node
    CREATE = "create"  # a new tensor from sizes alone (arange, full): every node makes it
    SHAPE = "shape"  # sizes, asserts: no tensor data
    FALLBACK = "fallback"  # gathered on one node, run there, split again


# Ops kept whole where the graph is decomposed to core ATen (only when it mutates views of activations:
# capture.py): rules (and ranks) are better with them in one piece.
PRESERVED = (
    aten.linear.default, aten.scaled_dot_product_attention.default,
    aten.silu.default, aten.hardswish.default, aten.hardsigmoid.default, aten.mish.default,
    aten.pixel_shuffle.default, aten.pixel_unshuffle.default, aten.channel_shuffle.default,
)

_MOVE = (
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default, aten.expand.default,
    aten.slice.Tensor, aten.select.int, aten.cat.default, aten.split_with_sizes.default, aten.split.Tensor,
    aten.unbind.int, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default,
    aten.alias.default, aten.as_strided.default, aten.constant_pad_nd.default, aten.index.Tensor,
    aten.index_select.default, aten.gather.default, aten.flip.default, aten.roll.default, aten.repeat.default,
    aten.diagonal.default, aten.t.default, aten.transpose.int, aten.pixel_shuffle.default,
    aten.pixel_unshuffle.default, aten.channel_shuffle.default, aten.narrow.default, aten.unfold.default,
    aten.im2col.default, aten.slice_scatter.default, aten.select_scatter.default, aten.copy.default,
    aten.stack.default, aten.detach.default, aten.lift_fresh_copy.default, aten.index_put.default,
    aten.scatter.src, aten.scatter.value, aten.tril.default, aten.triu.default, aten.contiguous.default,
    aten.expand_copy.default, aten.view_copy.default, aten.permute_copy.default,
    # as torch.export's graph has them before decomposition
    aten.flatten.using_ints, aten.reshape_as.default, aten.expand_as.default, aten.view_as.default,
    aten.unflatten.int, aten.chunk.default, aten.repeat_interleave.self_int, aten.pad.default, aten.movedim.int,
    aten.swapaxes.default, aten.tensor_split.sections, aten.split.sizes, aten.hsplit.int,
)
# Which operands of a move hold indices: they must be constants of the model, known before the run.
INDEX_OPERANDS = {aten.index.Tensor: "indices", aten.index_select.default: "index", aten.gather.default: "index",
                  aten.index_put.default: "indices", aten.scatter.src: "index", aten.scatter.value: "index"}


def index_operands(graph_node: fx.Node) -> set[fx.Node]:
    """The operands of a data movement that hold indices (they must be constants of the model)."""
    name = INDEX_OPERANDS.get(graph_node.target)
    if name is None:
        return set()
    position = next(i for i, a in enumerate(graph_node.target._schema.arguments) if a.name == name)
    value = graph_node.kwargs.get(name, graph_node.args[position] if position < len(graph_node.args) else None)
    return {a for a in tree_leaves(value) if isinstance(a, fx.Node)}


_POINTWISE_EXTRA = (
    aten._to_copy.default, aten.full_like.default, aten.zeros_like.default, aten.ones_like.default,
    aten.empty_like.default, aten.rand_like.default, aten.randn_like.default, aten.fill.Scalar, aten.hardswish.default,
    aten.masked_fill.Tensor, aten.where.ScalarOther, aten.where.ScalarSelf, aten.native_dropout.default,
    aten.dropout.default, aten.clamp_min.default, aten.clamp_max.default,
    aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten.type_as.default, aten.hardswish_.default,
    aten.dropout_.default, aten.feature_dropout.default, aten.alpha_dropout.default, aten.addcmul.default,
    aten.addcdiv.default, aten.relu6.default, aten.hardtanh_.default,
)
_WINDOW = (
    aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default, aten.max_pool2d_with_indices.default,
    aten.max_pool3d_with_indices.default, aten.max_pool1d.default, aten.max_pool2d.default,
    aten._adaptive_avg_pool2d.default, aten._adaptive_avg_pool3d.default, aten.adaptive_max_pool2d.default,
    aten.adaptive_avg_pool1d.default, aten.adaptive_max_pool1d.default, aten._adaptive_avg_pool2d.default,
    aten.upsample_nearest2d.vec, aten.upsample_bilinear2d.vec, aten.upsample_nearest1d.vec,
    aten.upsample_linear1d.vec, aten.upsample_bicubic2d.vec, aten._upsample_bilinear2d_aa.vec,
    aten.upsample_nearest2d.default, aten.upsample_bilinear2d.default, aten.upsample_nearest3d.vec,
    aten.upsample_trilinear3d.vec, aten.reflection_pad1d.default, aten.reflection_pad2d.default,
    aten.reflection_pad3d.default, aten.replication_pad1d.default, aten.replication_pad2d.default,
    aten.replication_pad3d.default,
    aten._softmax.default, aten._log_softmax.default, aten.cumsum.default, aten.cumprod.default,
    aten.sort.default, aten.topk.default, aten.logcumsumexp.default,
    aten.softmax.int, aten.log_softmax.int, aten.adaptive_avg_pool2d.default, aten.adaptive_avg_pool1d.default,
    aten.adaptive_avg_pool3d.default, aten.max_pool3d.default, aten.upsample_bicubic2d.default,
)
# How many trailing dims a spatial window op works over (pooling, interpolation, padding)
SPATIAL_DIMS = {op: int(found.group(1)) for op in _WINDOW
                for found in [re.search(r"([123])d$", str(op.overloadpacket))] if found}
SPATIAL_DIMS.update({aten._upsample_bilinear2d_aa.vec: 2, aten.max_pool2d_with_indices.default: 2,
                     aten.max_pool3d_with_indices.default: 3})
_REDUCE_EXTRA = (aten.var_mean.correction, aten.std.correction, aten.linalg_vector_norm.default,
                 aten.logsumexp.default, aten.all.dim, aten.all.default, aten.sum.default)
# Reductions whose partial results over each node's part combine into the whole (exchanged across nodes)
PARTIAL = {
    aten.sum.dim_IntList: "sum", aten.sum.default: "sum", aten.mean.dim: "mean", aten.mean.default: "mean",
    aten.amax.default: "max", aten.amin.default: "min", aten.any.dim: "max", aten.any.dims: "max",
    aten.any.default: "max", aten.all.dim: "min", aten.all.default: "min", aten.prod.dim_int: "prod",
    aten.prod.default: "prod", aten.var.correction: "var", aten.var.dim: "var",
}
_NORM = (aten.native_layer_norm.default, aten.native_group_norm.default,
         aten._native_batch_norm_legit_no_training.default, aten.layer_norm.default, aten.group_norm.default,
         aten.batch_norm.default)
_MIXING = (aten.convolution.default, aten.linear.default, aten.conv1d.default, aten.conv2d.default,
           aten.conv3d.default, aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding)
CONVOLUTIONS = _MIXING[:1] + _MIXING[2:]
CONTRACTIONS = (aten.mm.default, aten.bmm.default, aten.addmm.default, aten.baddbmm.default, aten.matmul.default)
BIASED_CONTRACTIONS = (aten.addmm.default, aten.baddbmm.default)  # (bias, a, b): the product a @ b plus a bias
_CREATE = (aten.arange.start_step, aten.arange.default, aten.arange.start, aten.full.default,
           aten.empty.memory_format, aten.empty_strided.default, aten.zeros.default, aten.ones.default,
           aten.scalar_tensor.default, aten.rand.default, aten.randn.default, aten.randperm.default)
_SHAPE = (aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int, aten.sym_storage_offset.default,
          aten._assert_tensor_metadata.default, aten._assert_scalar.default, aten.sym_constrain_range_for_size.default,
          aten.sym_constrain_range.default, aten._assert_async.msg)
# Python functions on sizes that a captured graph calls (symbolic batch arithmetic), and tuple indexing
PYTHON_SHAPE_FUNCTIONS = (operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv,
                          operator.mod, operator.neg, operator.eq, operator.ne, operator.lt, operator.le,
                          operator.gt, operator.ge, operator.pow)

_TABLE: dict = {}
for _rule, _ops in ((Rule.MOVE, _MOVE), (Rule.POINTWISE, _POINTWISE_EXTRA), (Rule.WINDOW, _WINDOW),
                    (Rule.REDUCE, _REDUCE_EXTRA), (Rule.NORM, _NORM), (Rule.MIXING, _MIXING),
                    (Rule.CONTRACT, CONTRACTIONS), (Rule.ATTENTION, (aten.scaled_dot_product_attention.default,)),
                    (Rule.CREATE, _CREATE), (Rule.SHAPE, _SHAPE)):
    for _op in _ops:
        _TABLE[_op] = _rule
_TABLE.update({f: Rule.SHAPE for f in PYTHON_SHAPE_FUNCTIONS})


def register_op_rule(op, rule: Rule) -> None:
    """Give an operation (an OpOverload such as `torch.ops.mylib.op.default`) one of the rules above in place of
    the fallback, e.g. `disco.register_op_rule(torch.ops.mylib.scale.default, Rule.POINTWISE)` (`Rule` from
    `disco.split.ops`)."""
    if not isinstance(rule, Rule):
        raise TypeError(f"rule must be a disco.split.ops.Rule, got {rule!r}")
    _TABLE[op] = rule


def rule_of(target) -> Rule:
    """The rule of a graph node's target; FALLBACK for anything DISCO has no rule for (`register_op_rule`)."""
    found = _TABLE.get(target)
    if found is not None:
        return found
    tags = getattr(target, "tags", ())
    if torch.Tag.pointwise in tags:
        return Rule.POINTWISE
    if torch.Tag.reduction in tags:
        return Rule.REDUCE
    return Rule.FALLBACK


def op_name(target) -> str:
    """A short readable name: `aten.convolution`, `getitem`."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target.overloadpacket)
    return getattr(target, "__name__", str(target))
