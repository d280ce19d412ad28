"""Follow channel ownership through a model's torch.fx graph while running it on an example input.

`analyse(model, example_inputs, nodes, choose_output)` runs the traced model once, node by node, and
carries beside every activation its owner map (see assignment.py). Each operation kind (rules.py) has
one rule for owner maps; an unknown operation, or one that would mix channels of different nodes
outside a channel-mixing layer, raises UnsupportedOperationError naming the graph node.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves, tree_map

from disco.errors import DiscoError, UnsupportedOperationError
from disco.split.assignment import REPLICATED, broadcast_channels, channel_vector, holds
from disco.split.layers import DiscoLayer, mixing_kind
from disco.split.window_attention import WINDOW_LEAVES
from disco.split.rules import OpKind, call_node, kind_of_node


class DiscoTracer(fx.Tracer):
    """torch.fx tracer that keeps Disco layers (subclasses of Conv/Linear) and the window-attention parts
    (whose shapes drive control flow) as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (DiscoLayer, *WINDOW_LEAVES)) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    try:
        graph = DiscoTracer().trace(model)
    except Exception as error:  # fx raises many types; the user needs to know it is tracing that failed
        raise DiscoError(f"torch.fx could not trace {type(model).__name__}: {error}") from error
    return fx.GraphModule(model, graph)


@dataclass
class MixingCall:
    """One call of a channel-mixing layer, as seen on the example input."""

    module: str
    node: str
    in_assign: torch.Tensor
    out_assign: torch.Tensor
    in_shape: torch.Size
    out_shape: torch.Size
    index: int


@dataclass
class ValueRecord:
    """Elements of one activation held by each node (replicated data counts on every node)."""

    index: int
    node: str
    elements_per_node: list[int]
    element_size: int
    last_use: int


@dataclass
class NormCall:
    """A norm over channels that span nodes (LayerNorm): nodes exchange two partial sums per position."""

    module: str
    node: str
    channels: torch.Tensor  # node of each normalised channel (last dim)
    positions: int  # positions (tokens, pixels) normalised per image


@dataclass
class AttentionCall:
    """One attention product (softmax(QK^T)V): local to each head's node, it costs MACs but no bytes."""

    node: str
    heads: torch.Tensor  # node of each head
    macs_per_head: int  # QK^T plus AV multiply-accumulates per head, per image


@dataclass
class GraphAnalysis:
    nodes: int
    batch: int
    mixing: list[MixingCall] = field(default_factory=list)
    channel_owner_of_module: dict[str, torch.Tensor | None] = field(default_factory=dict)
    values: list[ValueRecord] = field(default_factory=list)
    input_elements: int = 0
    output_elements: int = 0
    output_elements_per_node: list[int] = field(default_factory=list)
    replicated_attributes: set[str] = field(default_factory=set)  # parameters read directly (get_attr)
    attribute_channels: dict[str, tuple[torch.Tensor, int]] = field(default_factory=dict)  # split ones: (nodes, dim)
    norms: list[NormCall] = field(default_factory=list)
    attention: list[AttentionCall] = field(default_factory=list)


class AssignmentConflict(Exception):
    """Two operands of an elementwise op have the same channels on different nodes (internal)."""

    def __init__(self, node: fx.Node, operands: list[fx.Node], propagator: "OwnerPropagator"):
        self.node = node
        self.operands = operands
        self.propagator = propagator
        super().__init__(node.name)


class AttributeSplit(Exception):
    """A parameter read directly (class token, position embedding) meets channel-split data: it must be
    split the same way (internal: the propagation restarts with the attribute split)."""

    def __init__(self, target: str, vector: torch.Tensor, dim: int):
        self.target, self.vector, self.dim = target, vector, dim
        super().__init__(target)


# choose_output(module_name, module, in_assign, out_shape) -> out_assign for a channel-mixing layer
OutputChooser = Callable[[str, nn.Module, torch.Tensor, torch.Size], torch.Tensor]


def _describe(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {target}"


class OwnerPropagator(fx.Interpreter):
    """Runs the graph and computes an owner map for every value (see module docstring)."""

    def __init__(self, gm: fx.GraphModule, nodes: int, choose_output: OutputChooser,
                 attribute_splits: dict[str, tuple[torch.Tensor, int]] | None = None):
        super().__init__(gm)
        self.attribute_splits = attribute_splits or {}
        self.attribute_of: dict[fx.Node, str] = {}  # values computed from one directly-read parameter only
        self.nodes = nodes
        self.choose_output = choose_output
        self.owners: dict[fx.Node, object] = {}
        self.sources: dict[fx.Node, str | None] = {}  # mixing layer whose fresh output reaches here unchanged
        self.layout_origin: dict[fx.Node, fx.Node | None] = {}  # last op that moved channels off dim 1/-1
        self.analysis: GraphAnalysis | None = None
        self._index = {node: i for i, node in enumerate(gm.graph.nodes)}
        self.extra_traceback = False  # our errors already name the graph node

    # --- driving -----------------------------------------------------------------------------------
    def analyse(self, *inputs: torch.Tensor) -> GraphAnalysis:
        batch = inputs[0].shape[0] if inputs and inputs[0].dim() else 1
        self.analysis = GraphAnalysis(nodes=self.nodes, batch=batch)
        self.analysis.input_elements = sum(t.numel() for t in inputs) // batch
        with torch.no_grad():
            self.run(*inputs)
        return self.analysis

    def run_node(self, n: fx.Node):
        try:
            value = super().run_node(n)
        except (RuntimeError, TypeError, IndexError) as error:  # the model itself fails on this input
            raise DiscoError(f"the model fails on the example input at graph node '{n.name}' "
                             f"({_describe(n)}): {str(error).splitlines()[0]}") from error
        owner = self._owner_of(n, value)
        self.owners[n] = owner
        self._record_memory(n, value, owner)
        return value

    # --- rules -------------------------------------------------------------------------------------
    def _owner_of(self, n: fx.Node, value):
        if n.op == "output":
            owner = fx.node.map_arg(n.args[0], lambda a: self.owners[a])
            self.analysis.output_elements_per_node = self._elements_per_node(owner)
            self.analysis.output_elements = sum(t.numel() for t in tree_leaves(owner)
                                                if isinstance(t, torch.Tensor)) // self.analysis.batch
            return owner
        if not any(isinstance(leaf, torch.Tensor) for leaf in tree_leaves(value)):
            return value  # sizes, shapes, dtypes: their "owner map" is the value itself
        if n.op in ("placeholder", "get_attr"):
            self.sources[n] = None
            if n.op == "get_attr":
                return self._attribute(n, value)
            return tree_map(lambda t: torch.full(t.shape, float(REPLICATED)) if isinstance(t, torch.Tensor) else t,
                            value)
        kind, module = self._kind(n)
        if kind is OpKind.MIXING:
            return self._mixing(n, module, value)
        owner = {OpKind.ELEMENTWISE: self._elementwise, OpKind.SPATIAL: self._spatial,
                 OpKind.MOVE: self._move, OpKind.REDUCE: self._reduce, OpKind.NORM: self._norm,
                 OpKind.ATTENTION: self._attention}[kind](n, module, value)
        if module is not None:
            self._record_module_channels(n, module, owner)
        self._follow_attributes(n, owner)
        return owner

    # --- parameters read directly (get_attr) ------------------------------------------------------------
    def _attribute(self, n: fx.Node, value):
        self.attribute_of[n] = n.target
        if n.target in self.attribute_splits:
            vector, dim = self.attribute_splits[n.target]
            self.analysis.attribute_channels[n.target] = (vector, dim)
            return broadcast_channels(vector, value.shape, dim)
        self.analysis.replicated_attributes.add(n.target)
        return tree_map(lambda t: torch.full(t.shape, float(REPLICATED)) if isinstance(t, torch.Tensor) else t, value)

    def _follow_attributes(self, n: fx.Node, owner) -> None:
        """Track values made from one replicated parameter; when one meets channel-split data, ask for the
        parameter to be split like that data (AttributeSplit restarts the propagation)."""
        inputs = [a for a, _ in self._tensor_args(n)]
        from_attribute = [a for a in inputs if a in self.attribute_of]
        if from_attribute and len(from_attribute) == len(inputs):
            self.attribute_of[n] = self.attribute_of[from_attribute[0]]
            return
        if not from_attribute or not isinstance(owner, torch.Tensor) or not bool((owner >= 0).any()):
            return
        for source in from_attribute:
            target = self.attribute_of[source]
            if target in self.attribute_splits or not bool((self.owners[source] == REPLICATED).all()):
                continue
            parameter = self.fetch_attr(target)
            for dim in (-1, 1):
                vector = _split_vector(owner, dim)
                own_dim = dim if dim < 0 else dim - (owner.dim() - parameter.dim())  # broadcasting aligns right
                if vector is not None and 0 <= own_dim % max(parameter.dim(), 1) < parameter.dim() \
                        and parameter.shape[own_dim] == vector.numel():
                    raise AttributeSplit(target, vector, own_dim)

    def _kind(self, n: fx.Node) -> tuple[OpKind, nn.Module | None]:
        module = self.fetch_attr(n.target) if n.op == "call_module" else None
        kind = kind_of_node(n, module)
        if kind is None:
            what = type(module).__name__ if module is not None else _describe(n)
            raise UnsupportedOperationError(
                n.name, _describe(n),
                f"DISCO does not know how '{what}' moves or mixes channels, so it cannot split it across nodes; "
                "register it in disco.split.rules or rewrite the model with supported operations")
        return kind, module

    def _tensor_args(self, n: fx.Node) -> list[tuple[fx.Node, torch.Tensor]]:
        """(producer, owner map) of each tensor operand of n, in argument order."""
        found = []
        for arg in tree_leaves((n.args, n.kwargs)):
            if isinstance(arg, fx.Node) and isinstance(self.owners.get(arg), torch.Tensor):
                found.append((arg, self.owners[arg]))
        return found

    def _first_channels(self, n: fx.Node, dim: int, purpose: str) -> torch.Tensor:
        producer, owner = self._tensor_args(n)[0]
        vector = channel_vector(owner, dim)
        if vector is None:
            raise UnsupportedOperationError(n.name, _describe(n), f"{purpose} needs its input split by channel along "
                                            f"dim {dim}, but it is not{self._origin_hint(producer)}")
        return vector

    def _origin_hint(self, producer: fx.Node) -> str:
        origin = self.layout_origin.get(producer)
        if origin is None:
            return ""
        return (f": graph node '{origin.name}' ({_describe(origin)}) moved the split channel dimension, "
                "which DISCO cannot follow into this operation")

    def _inherit(self, n: fx.Node) -> None:
        args = self._tensor_args(n)
        first = args[0][0] if args else None
        self.sources[n] = self.sources.get(first)
        self.layout_origin[n] = self.layout_origin.get(first)

    def _elementwise(self, n: fx.Node, module, value):
        combined, combined_from = None, None
        operands = self._tensor_args(n)[:1] if module is not None else self._tensor_args(n)
        for producer, owner in operands:
            owner = owner.broadcast_to(value.shape)
            if combined is None:
                combined, combined_from = owner, producer
                continue
            conflict = (combined != owner) & (combined >= 0) & (owner >= 0)
            if bool(conflict.any()):
                raise AssignmentConflict(n, [combined_from, producer], self)
            combined = torch.where(combined >= 0, combined, owner)
        self._inherit(n)
        return combined

    def _spatial(self, n: fx.Node, module, value):
        dim = getattr(module, "disco_channel_dim", 1)
        vector = self._first_channels(n, dim, "this per-channel spatial operation")
        self._inherit(n)
        return broadcast_channels(vector, value.shape, dim)

    def _move(self, n: fx.Node, module, value):
        # Owner maps are often broadcast views; `view` needs real memory, so materialise them here. They
        # are shifted by one so that zeros an op pads with come out REPLICATED (-1), not node 0.
        def owner_of(a):
            return tree_map(lambda t: t.contiguous() + 1 if isinstance(t, torch.Tensor) else t, self.owners[a])
        args = fx.node.map_arg(n.args, owner_of)
        kwargs = fx.node.map_arg(n.kwargs, owner_of)
        owner = call_node(n, module, args, kwargs)
        owner = tree_map(lambda t: t - 1 if isinstance(t, torch.Tensor) else t, owner)
        if not any(bool((o == REPLICATED).any()) for _, o in self._tensor_args(n)):
            owner = tree_map(lambda t: _own_padding(t) if isinstance(t, torch.Tensor) else t, owner)
        self._inherit(n)
        if isinstance(owner, torch.Tensor):
            if channel_vector(owner, 1) is None and channel_vector(owner, -1) is None:
                self.layout_origin[n] = n
            self.sources[n] = None
        return owner

    def _norm(self, n: fx.Node, module, value):
        """LayerNorm over the last dim: local per node, plus partial sums exchanged between the nodes
        holding the normalised channels (counted apart)."""
        if len(getattr(module, "normalized_shape", (0, 0))) != 1:
            raise UnsupportedOperationError(n.name, _describe(n), "only norms over the last dim can be split")
        channels = self._first_channels(n, -1, "a norm over channels")
        self.analysis.norms.append(NormCall(n.target, n.name, channels,
                                            value.numel() // (self.analysis.batch * channels.numel())))
        self._inherit(n)
        return broadcast_channels(channels, value.shape, -1)

    def _attention(self, n: fx.Node, module, value):
        """Attention is local when whole heads (q, k and v alike) sit on one node. scaled_dot_product_attention
        takes [batch, heads, tokens, head_dim]; a module (Swin's WindowAttention) takes channels last."""
        dim, block = (-1, module.head_dim) if module is not None else (1, 1)
        vectors = []
        for producer, owner in self._tensor_args(n)[:3]:
            vector = channel_vector(owner, dim)
            if vector is None or not bool((vector.view(-1, block) == vector.view(-1, block)[:, :1]).all()):
                raise UnsupportedOperationError(n.name, _describe(n), "an attention head's channels are split "
                                                "across nodes; heads must be whole on one node")
            vectors.append(vector)
        if any(not torch.equal(v, vectors[0]) for v in vectors[1:]):
            raise UnsupportedOperationError(n.name, _describe(n), "q, k and v of a head live on different nodes")
        self._record_attention(n, module, vectors[0][::block])
        self._inherit(n)
        return broadcast_channels(vectors[0], value.shape, dim)

    def _record_attention(self, n: fx.Node, module, heads: torch.Tensor) -> None:
        q, k, v = (self.env[a] for a, _ in self._tensor_args(n)[:3])
        batch = self.analysis.batch
        if module is None:  # [B, heads, tokens, head_dim]: every query meets every key
            queries, keys = q.shape[-2], k.shape[-2]
            macs = queries * keys * (q.shape[-1] + v.shape[-1])
        else:  # channels last, whole windows: every token meets the tokens of its window
            window = module.window_size[0] * module.window_size[1]
            macs = (q.numel() // (batch * q.shape[-1])) * window * 2 * module.head_dim
        self.analysis.attention.append(AttentionCall(n.name, heads, macs))

    def _reduce(self, n: fx.Node, module, value):
        args, kwargs = list(n.args), dict(n.kwargs)
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
        owner = self._tensor_args(n)[0][1]
        dims = tuple(range(owner.dim())) if dim is None else dim
        low, high = owner.amin(dim=dims, keepdim=keepdim), owner.amax(dim=dims, keepdim=keepdim)
        if not bool((low == high).all()):
            raise UnsupportedOperationError(n.name, _describe(n), f"it reduces over dims {dims}, which hold channels "
                                            "of different nodes (a cross-node reduction)")
        self._inherit(n)
        return low.reshape(value.shape)

    def _mixing(self, n: fx.Node, module: nn.Module, value):
        channel_dim = mixing_kind(module).channel_dim
        in_assign = self._first_channels(n, channel_dim, f"channel-mixing layer {type(module).__name__}")
        out_assign = self.choose_output(n.target, module, in_assign, value.shape)
        x_shape = self._tensor_args(n)[0][1].shape
        self.analysis.mixing.append(MixingCall(n.target, n.name, in_assign, out_assign, x_shape, value.shape,
                                                   self._index[n]))
        self.sources[n] = n.target
        self.layout_origin[n] = None
        return broadcast_channels(out_assign, value.shape, channel_dim)

    # --- bookkeeping for memory and parameter accounting ------------------------------------------------
    def _record_module_channels(self, n: fx.Node, module: nn.Module, owner) -> None:
        dim = getattr(module, "disco_channel_dim", -1 if isinstance(module, nn.LayerNorm) else 1)
        vector = channel_vector(owner, dim) if isinstance(owner, torch.Tensor) and owner.dim() > 1 else None
        self.analysis.channel_owner_of_module.setdefault(n.target, vector)

    def _elements_per_node(self, owner) -> list[int]:
        counts = [0] * self.nodes
        for leaf in tree_leaves(owner):
            if isinstance(leaf, torch.Tensor):
                for k in range(self.nodes):
                    counts[k] += int(holds(leaf, k).sum()) // self.analysis.batch
        return counts

    def _record_memory(self, n: fx.Node, value, owner) -> None:
        tensors = [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]
        if n.op == "output" or not tensors:
            return
        last_use = max((self._index[u] for u in n.users), default=self._index[n])
        self.analysis.values.append(ValueRecord(self._index[n], n.name, self._elements_per_node(owner),
                                                tensors[0].element_size(), last_use))



def _split_vector(owner: torch.Tensor, dim: int) -> torch.Tensor | None:
    """The channel assignment along `dim` shared by every fully split (no replicated element) row of an
    owner map, or None."""
    if owner.dim() < 2:
        return None
    rows = owner.movedim(dim, -1).reshape(-1, owner.shape[dim])
    split_rows = rows[(rows >= 0).all(dim=1)]
    if not split_rows.numel() or not bool((split_rows == split_rows[0]).all()):
        return None
    return split_rows[0].to(torch.long)


def _own_padding(owner: torch.Tensor) -> torch.Tensor:
    """Padding (Swin's patch merging at odd sizes) adds constants to split data: each node pads its own
    channels, so a padded element belongs to the node of its channel (read from the unpadded rows)."""
    if owner.dim() < 2 or not bool((owner == REPLICATED).any()):
        return owner
    for dim in (-1, 1):
        vector = _split_vector(owner, dim)
        if vector is None:
            continue
        filled = torch.where(owner == REPLICATED, broadcast_channels(vector, owner.shape, dim), owner)
        if channel_vector(filled, dim) is not None:
            return filled
    return owner


def propagate(gm: fx.GraphModule, inputs: tuple, nodes: int, choose_output: OutputChooser) -> OwnerPropagator:
    """Run the owner propagation, splitting directly-read parameters where split data needs them."""
    splits: dict[str, tuple[torch.Tensor, int]] = {}
    while True:  # each restart splits one more parameter, so this ends
        propagator = OwnerPropagator(gm, nodes, choose_output, splits)
        try:
            propagator.analyse(*inputs)
            return propagator
        except AttributeSplit as split:
            if split.target in splits:
                raise DiscoError(f"parameter {split.target!r} would need two different splits") from None
            splits[split.target] = (split.vector, split.dim)
