"""One function per rule (ops.py): what an operation's result's owners are, and what it costs to get there.

Each takes the propagator `p`, the graph node and its value on the example, and returns the owner map of the
result (a tuple of them for several outputs), or None when the rule cannot split the operation as its operands lie
(then the general fallback runs it on one node). Layout changes a rule needs go through `p.pullback` (re-assign the
layer the operand comes from: free) or `p.change_operand` (move the data: counted).
"""
from __future__ import annotations

import math
import operator

import torch
from torch import fx
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from disco.errors import DiscoError
from disco.split.analysis import Exchange, Fallback, MixingCall, Products
from disco.split.assignment import REPLICATED, broadcast_channels, channel_vector, holds
from disco.split.balance import Balancer
from disco.split.capture import batch_axis, calling_module
from disco.split.layouts import fill_replicated, majority_along, needs, replicated, uniform_along
from disco.split.ops import CONVOLUTIONS, INDEX_OPERANDS, PARTIAL, SPATIAL_DIMS, Rule, op_name

aten = torch.ops.aten
NOT_NEEDED = -2.0


# --- helpers ---------------------------------------------------------------------------------------------
def index_operands(n: fx.Node) -> set[fx.Node]:
    """The operands of a data movement that hold indices (they must be constants of the model)."""
    name = INDEX_OPERANDS.get(n.target)
    if name is None:
        return set()
    position = next(i for i, a in enumerate(n.target._schema.arguments) if a.name == name)
    value = n.kwargs.get(name, n.args[position] if position < len(n.args) else None)
    return {a for a in tree_leaves(value) if isinstance(a, fx.Node)}


def _shaped_like(value, owners: list[torch.Tensor]):
    """Owner maps in the structure of a (possibly multi-output) value."""
    leaves, spec = tree_flatten(value)
    it = iter(owners)
    return tree_unflatten([next(it) if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves], spec)


def _tensors(value) -> list[torch.Tensor]:
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


def _holders(owner: torch.Tensor, nodes: int) -> torch.Tensor:
    """Where a static operand is needed when every node holding part of the result needs all of it."""
    present = [k for k in range(nodes) if bool(holds(owner, k).any())]
    return torch.full((), float(present[0] if len(present) == 1 else REPLICATED))


def _position(p, n: fx.Node, operand: fx.Node) -> int:
    return p.tensor_operands(n).index(operand)


def _move_to(p, n: fx.Node, operand: fx.Node, target: torch.Tensor, reason: str) -> torch.Tensor:
    """Give an operand layout `target`: re-assign its layer if it can be, else move it (counted)."""
    current = p.owner_of(operand)
    if torch.equal(current.broadcast_to(target.shape), target):
        return target
    if not p.pullback(operand, target):
        p.change_operand(n, _position(p, n, operand), target, reason)
    return target


def _arg(n: fx.Node, position: int, name: str, default=None):
    return n.kwargs.get(name, n.args[position] if len(n.args) > position else default)


# --- rules -------------------------------------------------------------------------------------------------
def pointwise(p, n: fx.Node, value):
    shape = _tensors(value)[0].shape
    combined, first = None, None
    for a in p.tensor_operands(n):
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
                own = _move_to(p, n, a, needs(p.shape_of(a), wanted), "its operands' channels live on "
                               "different nodes").broadcast_to(shape)
        combined = torch.where(combined >= 0, combined, own)
    return _shaped_like(value, [combined for _ in _tensors(value)])


def run_move(p, n: fx.Node, data_of):
    """Run a data movement with `data_of(operand)` in place of each data operand (indices keep their values, and
    constants it adds become 0)."""
    indices, operands = index_operands(n), set(p.tensor_operands(n))

    def arg(a):
        if a in operands and a not in indices:
            return data_of(a)
        return p.value_of(a)
    args = list(fx.node.map_arg(n.args, arg))
    kwargs = dict(fx.node.map_arg(n.kwargs, arg))
    constant = {aten.constant_pad_nd.default: 2, aten.scatter.value: 3, aten.pad.default: 3}.get(n.target)
    if constant is not None and len(args) > constant:
        args[constant] = 0  # what it adds is a constant: REPLICATED, whatever its value
    return n.target(*args, **kwargs)


def move(p, n: fx.Node, value):
    if n.target is aten.pad.default and _arg(n, 2, "mode", "constant") != "constant":
        return window(p, n, value)  # reflect/replicate padding works within each channel's spatial dims
    if any(a not in p.static for a in index_operands(n)):
        return None  # indices computed from the input: only the fallback can follow them
    shifted = run_move(p, n, lambda a: torch.zeros(p.shape_of(a)) if a in p.static else p.owner_of(a).contiguous() + 1)
    return _shaped_like(value, [fill_replicated(t - 1) for t in _tensors(shifted)])


def move_readers(p, n: fx.Node, operand: fx.Node, owners: list[torch.Tensor]) -> torch.Tensor:
    """Which node reads each element of one operand of a data movement whose results lie as `owners` say
    (NOT_NEEDED: none)."""
    shape = p.shape_of(operand)
    ids = run_move(p, n, lambda a: torch.arange(1, math.prod(shape) + 1, dtype=torch.float64).reshape(shape)
                   if a is operand else torch.zeros(p.shape_of(a), dtype=torch.float64))
    readers = torch.full((math.prod(shape) + 1,), NOT_NEEDED)
    for out_ids, owner in zip(_tensors(ids), owners):
        for k in range(p.nodes):
            picked = out_ids.broadcast_to(owner.shape)[holds(owner, k)].long().unique()
            current = readers[picked]
            readers[picked] = torch.where((current == NOT_NEEDED) | (current == k), torch.tensor(float(k)),
                                          torch.tensor(float(REPLICATED)))
    return readers[1:].reshape(shape)


def _window_dims(n: fx.Node, rank: int) -> list[int]:
    spatial = len(n.args[1]) // 2 if n.target is aten.pad.default else SPATIAL_DIMS.get(n.target)
    if spatial is not None:
        return list(range(rank - spatial, rank))
    if n.target is aten.topk.default:
        return [_arg(n, 2, "dim", -1) % rank]
    return [_arg(n, 1, "dim", -1) % rank]


def window(p, n: fx.Node, value):
    x = p.dynamic(n)[0]
    own = p.owner_of(x)
    dims = _window_dims(n, own.dim())
    kept = [d for d in range(own.dim()) if d not in dims]
    if any(t.dim() != own.dim() or any(t.shape[d] != own.shape[d] for d in kept) for t in _tensors(value)):
        return None
    line = uniform_along(own, dims)
    if line is None:
        line = majority_along(own, dims, p.nodes)
        _move_to(p, n, x, line.expand(own.shape), "it works along dims whose elements span nodes")
    return _shaped_like(value, [line.expand(t.shape) for t in _tensors(value)])


def _reduced_dims(n: fx.Node, rank: int) -> list[int]:
    position = 2 if n.target is aten.linalg_vector_norm.default else 1
    dims = _arg(n, position, "dim", None)
    if dims is None or dims == []:
        return list(range(rank))
    dims = [dims] if isinstance(dims, int) else list(dims)
    return sorted(d % rank for d in dims)


def reduce(p, n: fx.Node, value):
    x = p.dynamic(n)[0]
    own = p.owner_of(x)
    dims = _reduced_dims(n, own.dim())
    axis = batch_axis(x)
    if axis is not None and axis.dim in dims:
        raise DiscoError(f"graph node '{n.name}' ({op_name(n.target)}) reduces over the images of a batch: DISCO "
                         "runs images independently and cannot split a model that mixes them")
    outputs = _tensors(value)
    line = uniform_along(own, dims)
    if line is not None:
        return _shaped_like(value, [line.reshape(t.shape) for t in outputs])
    kind = PARTIAL.get(n.target)
    if kind is None or len(outputs) != 1 or bool((own == REPLICATED).any()):
        return None
    values = outputs[0].numel() * (2 if kind == "var" else 1)
    holders = own.unique().long().tolist()
    matrix = torch.zeros(p.nodes, p.nodes, dtype=torch.long)
    for h in holders:
        matrix[h] = values
        matrix[h, h] = 0
    p.record(Exchange(n.name, op_name(n.target), kind, matrix))
    return replicated(outputs[0].shape)


def _stats_used(n: fx.Node) -> bool:
    return any(u.target is operator.getitem and u.args[1] != 0 and u.users for u in n.users)


def channel_aligned(shape, own: torch.Tensor) -> tuple[int, ...]:
    """A per-channel parameter's shape aligned with its input's channels (dim 1), for broadcasting."""
    return tuple(math.prod(shape) if d == 1 else 1 for d in range(own.dim()))


_BATCH_NORMS = (aten._native_batch_norm_legit_no_training.default, aten.batch_norm.default)
_LAYER_NORMS = (aten.native_layer_norm.default, aten.layer_norm.default)


def norm(p, n: fx.Node, value):
    x = n.args[0]
    if x in p.static or any(a not in p.static for a in p.tensor_operands(n)[1:]):
        return None
    own = p.owner_of(x)
    outputs = _tensors(value)
    if n.target in _BATCH_NORMS:
        return _shaped_like(value, [own] + [replicated(t.shape) for t in outputs[1:]])
    if n.target in _LAYER_NORMS:
        return _layer_norm(p, n, value, own, outputs)
    return _group_norm(p, n, value, own, outputs)


def _layer_norm(p, n, value, own, outputs):
    dims = list(range(own.dim() - len(n.args[1]), own.dim()))
    line = uniform_along(own, dims)
    if line is None:
        if bool((own == REPLICATED).any()) or _stats_used(n):
            return None
        positions = own.numel() // math.prod(own.shape[d] for d in dims)
        holders = own.unique().long().tolist()
        matrix = torch.zeros(p.nodes, p.nodes, dtype=torch.long)
        for h in holders:
            for g in holders:
                if g != h:
                    matrix[h, g] = 2 * positions
        p.record(Exchange(n.name, op_name(n.target), "layer_norm", matrix))
        stats = [replicated(t.shape) for t in outputs[1:]]
    else:
        stats = [line.reshape(t.shape) for t in outputs[1:]]
    return _shaped_like(value, [own] + stats)


def _group_norm(p, n, value, own, outputs):
    native = n.target is aten.native_group_norm.default
    groups = n.args[6] if native else n.args[1]
    vector = channel_vector(own, 1)
    if vector is None:
        return None
    per_group = vector.reshape(groups, -1)
    spanning = per_group.amin(1) != per_group.amax(1)
    if bool(spanning.any()):
        if bool((per_group[spanning] < 0).any()) or _stats_used(n):
            return None
        matrix = torch.zeros(p.nodes, p.nodes, dtype=torch.long)
        for row in per_group[spanning]:
            holders = row.unique().tolist()
            for h in holders:
                for g in holders:
                    if g != h:
                        matrix[h, g] += 2
        p.record(Exchange(n.name, op_name(n.target), "group_norm", matrix))
    return _shaped_like(value, [own] + [replicated(t.shape) for t in outputs[1:]])


def mixing(p, n: fx.Node, value):
    conv = n.target in CONVOLUTIONS
    x, weight = n.args[0], n.args[1]
    bias = _arg(n, 2, "bias")
    if n.target is aten.convolution.default and n.args[6]:
        return None  # transposed convolution: the fallback runs it
    if weight not in p.static or (isinstance(bias, fx.Node) and bias not in p.static) or x in p.static:
        return None
    channel_dim = 1 if conv else -1
    own = p.owner_of(x)
    layer = p.layer_of(weight)
    vector = channel_vector(own, channel_dim)
    if layer is None or (vector is None and not conv and uniform_along(own, [own.dim() - 1]) is not None):
        return _local_contraction(p, n, value, own, [own.dim() - 1] if not conv else list(range(1, own.dim())))
    first = p.first_inputs.get(layer)
    if vector is None or (first is not None and not torch.equal(vector, first)):
        vector = first if first is not None else Balancer(p.nodes, p.node_weights).proportional(
            own.shape[channel_dim]).float()
        _move_to(p, n, x, broadcast_channels(vector, own.shape, channel_dim).float(),
                 "a layer reads its channels along another dim than they are split")
        vector = vector.long()
    p.first_inputs.setdefault(layer, vector)
    groups = conv_groups(n)
    out_assign = p.choose_output(layer, p.model.get_submodule(layer), vector, value.shape, groups)
    call = MixingCall(layer, n.name, vector, out_assign, own.shape, value.shape, p.index_of(n), channel_dim, groups,
                      weight.name, bias.name if isinstance(bias, fx.Node) else "", calling_module(n))
    p.record(call)
    p.layer_outputs[n] = call
    return broadcast_channels(out_assign, value.shape, channel_dim)


def conv_groups(n: fx.Node) -> int:
    """The groups of a convolution node (1 for a linear)."""
    if n.target is aten.convolution.default:
        return n.args[8]
    if n.target in CONVOLUTIONS:
        return _arg(n, 6, "groups", 1)
    return 1


def _local_contraction(p, n, value, own, contracted):
    """A conv/linear whose weight is no layer's, or a linear over a dim that is not split (MLP-Mixer's token mixing):
    local wherever the contracted dims are held by one node."""
    line = uniform_along(own, contracted)
    if line is None:
        return None
    result = line.expand(value.shape)
    p.record(Products(n.name, _per_node(p, result, math.prod(n.args[1].meta["val"].shape[1:]))))
    return result


def _per_node(p, owner: torch.Tensor, macs_per_element: int) -> list[int]:
    return [int(holds(owner, k).sum()) * macs_per_element for k in range(p.nodes)]


def contract(p, n: fx.Node, value):
    bias = None
    if n.target in (aten.addmm.default, aten.baddbmm.default):
        bias, a, b = n.args[0], n.args[1], n.args[2]
    else:
        a, b = n.args[0], n.args[1]
    ao, bo = p.owner_of(a), p.owner_of(b)
    if ao.dim() < 2 or bo.dim() < 2:
        return None
    a_line, b_line = uniform_along(ao, [ao.dim() - 1]), uniform_along(bo, [bo.dim() - 2])
    result = None
    if a_line is not None and b_line is not None:
        left, right = a_line.broadcast_to(value.shape), b_line.broadcast_to(value.shape)
        if not bool(((left != right) & (left >= 0) & (right >= 0)).any()):
            result = torch.where(left >= 0, left, right)
    if result is None:
        if value.dim() < 3 or ao.dim() < 3 or bo.dim() < 3 or a in p.static or b in p.static:
            return None
        lead = majority_along(ao, [ao.dim() - 2, ao.dim() - 1], p.nodes)
        _move_to(p, n, a, lead.expand(ao.shape), "a product reads elements held on several nodes")
        # b's batch dims may broadcast against a's (a lambda layer's one position matrix for every head): each of
        # its matrices goes to every node whose products read it
        b_lead = needs((*bo.shape[:-2], 1, 1), lead.broadcast_to((*value.shape[:-2], 1, 1)))
        _move_to(p, n, b, b_lead.expand(bo.shape), "a product reads elements held on several nodes")
        result = lead.broadcast_to((*value.shape[:-2], 1, 1)).expand(value.shape)
    if isinstance(bias, fx.Node) and bias not in p.static and \
            not torch.equal(p.owner_of(bias).broadcast_to(result.shape), result):
        _move_to(p, n, bias, needs(p.shape_of(bias), result), "a product's bias lives elsewhere")
    p.record(Products(n.name, _per_node(p, result, ao.shape[-1])))
    return result


def attention(p, n: fx.Node, value):
    q, k, v = n.args[0], n.args[1], n.args[2]
    mask = _arg(n, 3, "attn_mask")
    if _arg(n, 7, "enable_gqa", False) or any(a in p.static for a in (q, k, v)):
        return None
    owners = [p.owner_of(a) for a in (q, k, v)]
    lines = [uniform_along(o, [o.dim() - 2, o.dim() - 1]) for o in owners]
    lead_shape = value.shape[:-2]
    if all(line is not None for line in lines) and all(
            torch.equal(line.broadcast_to((*lead_shape, 1, 1)), lines[0].broadcast_to((*lead_shape, 1, 1)))
            for line in lines):
        heads = lines[0].broadcast_to((*lead_shape, 1, 1))
    else:
        if value.dim() >= 3 and value.shape[-3] > 1:
            per_head = Balancer(p.nodes, p.node_weights).proportional(value.shape[-3]).float().reshape(-1, 1, 1)
            heads = per_head.expand((*lead_shape, 1, 1))
        else:
            heads = majority_along(owners[0], [owners[0].dim() - 2, owners[0].dim() - 1], p.nodes)
        for a, o in zip((q, k, v), owners):
            _move_to(p, n, a, heads.broadcast_to((*o.shape[:-2], 1, 1)).expand(o.shape),
                     "q, k and v of an attention head must sit on one node")
    result = heads.expand(value.shape)
    if isinstance(mask, fx.Node) and mask not in p.static:
        scores = heads.expand((*lead_shape, value.shape[-2], owners[1].shape[-2]))
        _move_to(p, n, mask, needs(p.shape_of(mask), scores), "an attention mask lives elsewhere")
    tokens, keys = value.shape[-2], owners[1].shape[-2]
    per_head = tokens * keys * (owners[0].shape[-1] + owners[2].shape[-1])
    p.record(Products(n.name, [int(holds(heads, node).sum()) * per_head for node in range(p.nodes)]))
    return result


def create(p, n: fx.Node, value):
    return _shaped_like(value, [replicated(t.shape) for t in _tensors(value)])


def fallback(p, n: fx.Node, value, reason: str):
    """Gather the operands on the node holding most of them, run there, and split the result again like its
    first operand when it has that operand's shape."""
    operands = p.tensor_operands(n)
    counts = torch.zeros(p.nodes, dtype=torch.long)
    for a in operands:
        if a not in p.static:
            own = p.owner_of(a)
            counts += torch.tensor([int((own == k).sum()) for k in range(p.nodes)])
    executor = int(counts.argmax())
    for position, a in enumerate(operands):
        if a not in p.static and not bool(holds(p.owner_of(a), executor).all()):
            p.change_operand(n, position, torch.full(tuple(p.shape_of(a)), float(executor)), reason)
    outputs = _tensors(value)
    result = [torch.full((), float(executor)).expand(t.shape) for t in outputs]
    dynamic = [a for a in operands if a not in p.static]
    if len(outputs) == 1 and dynamic and isinstance(value, torch.Tensor) and \
            value.shape == p.shape_of(dynamic[0]) and len(p.owner_of(dynamic[0]).unique()) > 1:
        p.change_result(n, p.owner_of(dynamic[0]), "its result is split again like its input")
    p.record(Fallback(n.name, op_name(n.target), executor, reason, _fallback_macs(n, value)))
    p.run_on(n, executor)
    return _shaped_like(value, result)


def _fallback_macs(n: fx.Node, value) -> int:
    if not isinstance(value, torch.Tensor):
        return 0
    if n.target in CONVOLUTIONS:
        return value.numel() * math.prod(n.args[1].meta["val"].shape[1:])
    if n.target in (aten.mm.default, aten.bmm.default, aten.addmm.default, aten.baddbmm.default, aten.matmul.default):
        a = n.args[1] if n.target in (aten.addmm.default, aten.baddbmm.default) else n.args[0]
        return value.numel() * int(a.meta["val"].shape[-1])
    if n.target is aten.linear.default:
        return value.numel() * int(n.args[1].meta["val"].shape[-1])
    return 0


RULES = {Rule.POINTWISE: pointwise, Rule.MOVE: move, Rule.WINDOW: window, Rule.REDUCE: reduce, Rule.NORM: norm,
         Rule.MIXING: mixing, Rule.CONTRACT: contract, Rule.ATTENTION: attention, Rule.CREATE: create,
         Rule.FALLBACK: lambda p, n, value: None}
