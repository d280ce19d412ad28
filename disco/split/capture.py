"""Capture a model as a graph of ATen operations (docs/method.md 3): `torch.export` with a batch of any size.

torch.export (non-strict) runs the model's own Python forward, so models that `torch.fx` symbolic tracing cannot
follow (control flow on sizes, iteration over tensors: timm and transformers models) capture as they are. Shapes
are those of the example input except the batch, which stays symbolic: every graph node's `meta["val"]` says which
dim of its value holds the images (`batch_axis`), and the graph runs on any batch size.

The graph is export's own (ATen operations before decomposition: conv2d, layer_norm, matmul...), which ranks run
as fast as eager PyTorch. Only a graph that writes into a view of an activation (`y[:, 0] = ...`) is decomposed
to core ATen, which is functional (`run_decompositions`, keeping `ops.PRESERVED` whole): decomposing costs two to
three times the capture itself (5 s for mobilenet_v2), and every rank captures its model when it starts.
"""
from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves

from disco.errors import DiscoError
from disco.split.ops import CONVOLUTIONS, PRESERVED, Rule, rule_of

INPUT, PARAMETER, BUFFER, CONSTANT = "input", "parameter", "buffer", "constant"


@dataclass
class Captured:
    """A captured graph: `graph_module` runs it (placeholders: parameters, buffers and constants first, then
    the input), `roles[placeholder] = (role, qualified name)`."""

    graph_module: fx.GraphModule
    roles: dict[fx.Node, tuple[str, str]]
    constants: dict[str, torch.Tensor] = field(default_factory=dict)  # tensors created in forward, by name
    out_spec: object = None  # the model's output structure (pytree spec) over the graph's flat outputs

    @property
    def input_graph_node(self) -> fx.Node:
        return next(graph_node for graph_node, (role, _) in self.roles.items() if role == INPUT)


class _Logits(nn.Module):
    """The model's output as a tensor or a tuple of tensors: a transformers ModelOutput gives its logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        logits = getattr(out, "logits", None)
        return logits if isinstance(logits, torch.Tensor) else out


def capture(model: nn.Module, example: torch.Tensor) -> Captured:
    """The model (in its current train/eval mode) as a core ATen graph for inputs shaped like `example`."""
    batch = torch.export.Dim("batch")
    two = example[:1].expand(2, *example.shape[1:]).contiguous()  # size 1 would be specialised away
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported = torch.export.export(_Logits(model), (two,), dynamic_shapes=({0: batch},), strict=False)
            names = _canonical_names(model)
            captured = Captured(exported.graph_module, _roles(exported, names), dict(exported.constants),
                                exported.call_spec.out_spec)
            if _writes_into_views(captured):
                table = torch.export.default_decompositions()
                for op in PRESERVED:
                    table.pop(op, None)
                exported = exported.run_decompositions(table)
                captured = Captured(exported.graph_module, _roles(exported, names), dict(exported.constants),
                                    exported.call_spec.out_spec)
    except DiscoError:
        raise
    except Exception as error:  # torch.export raises many types; the user needs to know capture failed, and why
        _runs_eagerly(model, example)
        raise DiscoError(f"could not capture {type(model).__name__} as a graph (torch.export): "
                         f"{_first_line(error)}") from error
    return captured


def _runs_eagerly(model: nn.Module, example: torch.Tensor) -> None:
    """When capture fails, say so plainly if the model fails on the example input by itself."""
    try:
        with torch.no_grad():
            model(example)
    except Exception as error:  # the model's own failure: wrong channels or size for it
        raise DiscoError(f"the model fails on the example input of shape {tuple(example.shape)}: "
                         f"{_first_line(error)}") from error


def _writes_into_views(captured: Captured) -> bool:
    """Does an operation write in place into an activation that data movement views (or that is such a view)?
    Then a rank, whose views may be copies, would not see the write: the graph must be made functional."""
    static = static_nodes(captured)
    for graph_node in captured.graph_module.graph.nodes:
        schema = getattr(graph_node.target, "_schema", None)
        if graph_node.op != "call_function" or schema is None or not schema.is_mutable:
            continue
        for arg, spec in zip(graph_node.args, schema.arguments):
            if not (isinstance(arg, fx.Node) and spec.alias_info is not None and spec.alias_info.is_write) \
                    or arg in static:
                continue
            viewed = arg.op == "call_function" and rule_of(arg.target) is Rule.MOVE
            if viewed or any(u is not graph_node and u.op == "call_function" and rule_of(u.target) is Rule.MOVE
                             for u in arg.users):
                return True
    return False


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:400]


def _canonical_names(model: nn.Module) -> dict[str, str]:
    """{any name of a parameter or buffer: the name model.named_parameters()/named_buffers() gives it}: a module
    shared under two names (CoaT's convolutional position encoding) is one layer, named as the model lists it."""
    names = {}
    for listing in (model.named_parameters, model.named_buffers):
        first = {id(tensor): name for name, tensor in listing()}
        names.update({alias: first[id(tensor)] for alias, tensor in listing(remove_duplicate=False)})
    return names


def _roles(exported, names: dict[str, str]) -> dict[fx.Node, tuple[str, str]]:
    from torch.export.graph_signature import InputKind

    kinds = {InputKind.USER_INPUT: INPUT, InputKind.PARAMETER: PARAMETER, InputKind.BUFFER: BUFFER,
             InputKind.CONSTANT_TENSOR: CONSTANT}
    placeholders = [graph_node for graph_node in exported.graph.nodes if graph_node.op == "placeholder"]
    roles = {}
    for placeholder, spec in zip(placeholders, exported.graph_signature.input_specs):
        if spec.kind not in kinds:
            raise DiscoError(f"could not capture the model: unsupported graph input {spec.kind.name} "
                             f"({placeholder.name})")
        target = spec.target or ""
        target = target.removeprefix("model.")
        roles[placeholder] = (kinds[spec.kind], names.get(target, target))
    if sum(role == INPUT for role, _ in roles.values()) != 1:
        raise DiscoError("the runtime supports models with one input tensor")
    return roles


def calling_module(graph_node: fx.Node) -> str | None:
    """The path of the module whose forward computed a value ('' the model's own; None when not recorded)."""
    stack = graph_node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return "" if path == "model" else path.removeprefix("model.")


def placeholder_values(captured: Captured, model: nn.Module, example: torch.Tensor) -> list:
    """Values for the graph's placeholders, in order: the model's own parameters and buffers, the capture's
    constants, and the example input."""
    values = []
    for role, name in captured.roles.values():
        if role == INPUT:
            values.append(example)
        elif role == PARAMETER:
            values.append(model.get_parameter(name))
        elif role == BUFFER:
            values.append(model.get_buffer(name))
        else:
            values.append(captured.constants[f"model.{name}"] if f"model.{name}" in captured.constants
                          else captured.constants[name])
    return values


# --- static values: computed from the model's own tensors alone ------------------------------------------------
def _batch_symbols(graph_node: fx.Node) -> bool:
    value = graph_node.meta.get("val")
    if isinstance(value, torch.SymInt):
        return bool(value.node.expr.free_symbols)
    if isinstance(value, torch.Tensor):
        return any(isinstance(s, torch.SymInt) and not _is_constant(s) for s in value.shape)
    return False


def _is_constant(size) -> bool:
    return not isinstance(size, torch.SymInt) or not size.node.expr.free_symbols


def static_nodes(captured: Captured) -> set[fx.Node]:
    """Graph nodes whose value depends on the model's parameters, buffers and constants only (not on the input, not on
    the batch size): known before any image is seen. Data movement of such tensors that only activations read (an
    attention bias gathered from its table by a constant index) is left to the ranks: a shard then stores the
    table's part each node reads, not a gathered copy many times its size."""
    static: set[fx.Node] = set()
    for graph_node in captured.graph_module.graph.nodes:
        if graph_node.op == "get_attr":
            static.add(graph_node)  # a submodule of the graph (a higher-order operation's body)
        elif graph_node.op == "placeholder":
            if captured.roles[graph_node][0] != INPUT:
                static.add(graph_node)
        elif graph_node.op == "call_function" and all(a in static for a in graph_node.all_input_nodes) \
                and not _batch_symbols(graph_node):
            static.add(graph_node)
    for graph_node in reversed(list(captured.graph_module.graph.nodes)):
        if graph_node in static and graph_node.op == "call_function" and rule_of(graph_node.target) is Rule.MOVE \
                and graph_node.users and all(u not in static and not _is_layer_weight(graph_node, u)
                                             for u in graph_node.users):
            static.discard(graph_node)
    return static


def _is_layer_weight(graph_node: fx.Node, user: fx.Node) -> bool:
    return (user.target in CONVOLUTIONS or user.target is torch.ops.aten.linear.default) \
        and graph_node in user.args[1:3]


# --- where the images are in each value ---------------------------------------------------------------------
@dataclass(frozen=True)
class BatchAxis:
    """The value's dim `dim` holds `per_image` x batch entries, images outermost."""

    dim: int
    per_image: int = 1


def batch_axis(graph_node: fx.Node) -> BatchAxis | None:
    """Where a value's images are, from its symbolic shape (None: the value has no batch dim)."""
    return batch_axis_of(graph_node.meta.get("val"), graph_node.name)


def batch_axes(graph_node: fx.Node) -> list[BatchAxis | None]:
    """The batch axis of each tensor an operation makes (several for a multi-output operation)."""
    return [batch_axis_of(v, graph_node.name) for v in tree_leaves(graph_node.meta.get("val"))
            if isinstance(v, torch.Tensor)]


def batch_axis_of(value, name: str = "?") -> BatchAxis | None:
    if not isinstance(value, torch.Tensor):
        return None
    found = [(d, s) for d, s in enumerate(value.shape) if not _is_constant(s)]
    if not found:
        return None
    if len(found) > 1:
        raise DiscoError(f"graph node '{name}' has the batch in several dims {[d for d, _ in found]}: "
                         "DISCO runs images independently and cannot split a model that mixes them")
    dim, size = found[0]
    expr = size.node.expr
    symbol = next(iter(expr.free_symbols))
    ratio = expr / symbol
    if ratio.free_symbols or not ratio.is_integer or int(ratio) < 1:
        raise DiscoError(f"graph node '{name}' has {expr} entries in its batch dim: DISCO runs images "
                         "independently and cannot split a model that mixes them")
    return BatchAxis(dim, int(ratio))


def shape_at(graph_node: fx.Node, batch: int) -> tuple[int, ...]:
    """The shape of a graph node's value for `batch` images."""
    value = graph_node.meta["val"]
    axis = batch_axis(graph_node)
    shape = [int(s) if _is_constant(s) else 0 for s in value.shape]
    if axis is not None:
        shape[axis.dim] = axis.per_image * batch
    return tuple(shape)


def elements_per_image(graph_node: fx.Node) -> int:
    return math.prod(shape_at(graph_node, 1))


def static_values(captured: Captured, model: nn.Module, wanted: list[fx.Node]) -> dict[fx.Node, torch.Tensor]:
    """The values of static graph nodes (`static_nodes`) computed from the model's current parameters: what a shard
    stores of the tensors an operation reads (a gathered bias table, a standardised conv weight). Every static
    operation up to the last wanted one runs, in order: one may write in place into another's value."""
    static = static_nodes(captured)
    last = max((i for i, graph_node in enumerate(captured.graph_module.graph.nodes) if graph_node in set(wanted)),
               default=-1)
    values: dict[fx.Node, object] = {}
    placeholders = dict(zip(list(captured.roles), placeholder_values(captured, model, None)))
    with torch.no_grad():
        for index, graph_node in enumerate(captured.graph_module.graph.nodes):
            if index > last:
                break
            if graph_node not in static:
                continue
            if graph_node.op == "placeholder":
                values[graph_node] = placeholders[graph_node]
            elif graph_node.op == "get_attr":
                values[graph_node] = getattr(captured.graph_module, graph_node.target)
            else:
                args = fx.node.map_arg(graph_node.args, lambda a: values[a])
                kwargs = fx.node.map_arg(graph_node.kwargs, lambda a: values[a])
                values[graph_node] = graph_node.target(*args, **kwargs)
    return {graph_node: values[graph_node] for graph_node in wanted}


def graph_digest(captured: Captured) -> str:
    """A fingerprint of the graph's structure (operations, their arguments, shapes): a rank that captures the
    model again checks it captured the same graph as the exporter."""
    digest = hashlib.sha256()
    for graph_node in captured.graph_module.graph.nodes:
        value = graph_node.meta.get("val")
        shape = tuple(str(s) for s in value.shape) if isinstance(value, torch.Tensor) else ()
        digest.update(f"{graph_node.op}|{graph_node.name}|{graph_node.target}|{graph_node.args}|{graph_node.kwargs}|"
                      f"{shape}\n".encode())
    return digest.hexdigest()


def capture_without_weights(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[Captured, nn.Module, torch.Tensor]:
    """A model built on the meta device (no memory for weights) captured as `capture` captures the real model on
    the CPU: its tensors become fake CPU tensors (shapes and dtypes, no data), so every operation records the
    devices and constants the exporter's capture recorded. Returns the capture, the fake model and example."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        for module in model.modules():
            for key, parameter in list(module._parameters.items()):
                if parameter is not None:
                    module._parameters[key] = nn.Parameter(torch.empty(parameter.shape, dtype=parameter.dtype),
                                                           parameter.requires_grad)
            for key, buffer in list(module._buffers.items()):
                if buffer is not None:
                    module._buffers[key] = torch.empty(buffer.shape, dtype=buffer.dtype)
        example = torch.empty((1, *input_shape))
        return capture(model, example), model, example
