"""`partition()`: turn a plain model into its simulation-mode DISCO twin, and the whole-model split it is made of
(`ModelSplit`: the graph analysis every later step reads, built once)."""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from disco.errors import DiscoError
from disco.options import PartitionOptions
from disco.split.analysis import GraphAnalysis
from disco.split.attention import replace_attention
from disco.split.balance import Balancer
from disco.split.capture import Captured, capture, placeholder_values, static_nodes, static_values
from disco.split.layers import DiscoLayer, calling_for, plain_layers, to_disco
from disco.split.plan import SplitPlan
from disco.split.propagate import OutputChooser, propagate
from disco.transport import get_transport_dtype

SPLIT_ATTRIBUTE = "disco_split"  # where a partitioned model keeps its ModelSplit


def as_input_tuple(example_inputs) -> tuple[torch.Tensor, ...]:
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise DiscoError("example_inputs must be a tensor or a tuple of tensors")
    return tuple(inputs)


def one_image(example_inputs) -> torch.Tensor:
    """The first image of the one input tensor a model takes."""
    inputs = as_input_tuple(example_inputs)
    if len(inputs) != 1:
        raise DiscoError("DISCO splits models that take one input tensor")
    if inputs[0].dim() < 1 or inputs[0].shape[0] < 1:
        raise DiscoError(f"example input of shape {tuple(inputs[0].shape)} has no image in its batch dim")
    return inputs[0][:1]


@contextmanager
def eval_mode(model: nn.Module):
    """Analyse in eval mode so BatchNorm statistics are not touched; restore the caller's mode after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training


def disco_layers(model: nn.Module) -> dict[str, DiscoLayer]:
    """The partitioned model's channel-mixing layers by qualified name, in definition order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, DiscoLayer)}


@dataclass
class ModelSplit:
    """The whole-model split made by `partition`: node count and weights, the input shape it was made for, and the
    graph analysis (every layer's calls, norms and reductions exchanged, data moved, fallbacks, where each other
    tensor of the model lives). The plans themselves are the layers' buffers (masks change; assignments do not)."""

    nodes: int
    node_weights: tuple[float, ...] | None
    input_shape: tuple[int, ...]  # of one image
    analysis: GraphAnalysis
    captured: Captured  # the graph (no weights: the model's own tensors fill it)

    def __deepcopy__(self, memo) -> "ModelSplit":
        return self  # facts about the architecture, never changed after partition: copies of the model share them

    def static_values(self, model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
        """The current values of static graph nodes by name (a layer's weight as its operation reads it, the tensors
        a shard stores for other operations), computed from the model's parameters."""
        by_name = {graph_node.name: graph_node for graph_node in self.captured.graph_module.graph.nodes}
        values = static_values(self.captured, model, [by_name[name] for name in names])
        return {graph_node.name: value for graph_node, value in values.items()}


def _chooser(nodes: int, weights: tuple[float, ...] | None):
    def make(overrides: dict[str, torch.Tensor]) -> OutputChooser:
        balancer = Balancer(nodes, weights)

        def choose(name: str, module: nn.Module, in_assign: torch.Tensor, out_shape: torch.Size,
                   groups: int) -> torch.Tensor:
            if isinstance(module, DiscoLayer):
                if not torch.equal(module.in_assign.cpu(), in_assign):
                    raise DiscoError(f"layer '{name}' now receives channels on other nodes than when it was "
                                     "partitioned; partition the model again")
                return module.out_assign.cpu()
            out_channels = module.weight.shape[0]
            macs_per_channel = module.weight[0].numel() * (math.prod(out_shape) // out_channels)
            if name not in balancer.chosen:
                balancer.chosen[name] = _output_assignment(balancer, name, module, in_assign, overrides,
                                                           macs_per_channel, groups)
                balancer.record(balancer.chosen[name], macs_per_channel)
            return balancer.chosen[name]
        return choose
    return make


def _output_assignment(balancer: Balancer, name: str, module: nn.Module, in_assign: torch.Tensor,
                       overrides: dict[str, torch.Tensor], macs_per_channel: int, groups: int) -> torch.Tensor:
    if name in overrides:
        return overrides[name]
    out_channels = module.weight.shape[0]
    if groups > 1:
        return balancer.grouped(in_assign, groups, out_channels, macs_per_channel * (out_channels // groups))
    block = getattr(module, "disco_channel_block", 1)  # e.g. attention heads: whole blocks on one node
    return balancer.proportional(out_channels // block).repeat_interleave(block)


def analyse(model: nn.Module, example: torch.Tensor, nodes: int, weights: tuple[float, ...] | None = None,
            provided: dict | None = None):
    """Capture the model and follow channel ownership on one image (propagate.py); layers not yet split get
    their outputs assigned in proportion to `weights` (balance.py; None: equal). Returns the propagator."""
    with eval_mode(model), plain_layers(model):
        captured = capture(model, example)
        static = static_nodes(captured)
        values = placeholder_values(captured, model, example)
        return propagate(captured, model, static, values, nodes, _chooser(nodes, weights), provided=provided,
                         node_weights=weights)


def model_split(model: nn.Module, example_inputs) -> ModelSplit:
    """The split of a partitioned model for inputs shaped like `example_inputs`: the one `partition` made, or (for
    another input size) the same layers' assignments followed through the model again."""
    layers = disco_layers(model)
    if not layers:
        raise DiscoError("this needs a partitioned model: call disco.partition(model, nodes=N, example_inputs=x) "
                         "first")
    example = one_image(example_inputs)
    split = getattr(model, SPLIT_ATTRIBUTE, None)
    if split is not None and split.input_shape == tuple(example.shape[1:]):
        return split
    nodes = node_count(model)
    weights = split.node_weights if split is not None else None
    propagator = analyse(model, example.detach().cpu() if example.device.type != "cpu" and _on_cpu(model)
                         else example.detach(), nodes, weights)
    return ModelSplit(nodes, weights, tuple(example.shape[1:]), propagator.analysis, propagator.captured)


def node_count(model: nn.Module) -> int:
    """How many nodes a partitioned model is split across."""
    split = getattr(model, SPLIT_ATTRIBUTE, None)
    if split is not None:
        return split.nodes
    layers = disco_layers(model)
    if not layers:
        raise DiscoError("this needs a partitioned model: call disco.partition(model, nodes=N, example_inputs=x)")
    return next(iter(layers.values())).nodes


def _on_cpu(model: nn.Module) -> bool:
    return all(p.device.type == "cpu" for p in model.parameters())


def partition(model: nn.Module, *, nodes: int, example_inputs, **options) -> nn.Module:
    """Simulation-mode model: one process computing exactly what `nodes` devices compute together.

    Every conv/linear becomes its Disco twin (same parameters, plus assignments and a group mask with
    every group kept), so the result's outputs equal the original model's until masks are changed.
    `options` are the fields of PartitionOptions other than `nodes`.
    """
    opts = PartitionOptions(nodes=nodes, **options)
    example = one_image(example_inputs)
    simulated = replace_attention(copy.deepcopy(model))
    propagator = analyse(simulated, example, opts.nodes, weights=opts.node_weights)
    analysis = propagator.analysis
    if not analysis.mixing:
        raise DiscoError(f"{type(model).__name__} has no channel-mixing layer (conv or linear) to split")
    plans: dict[str, SplitPlan] = {}
    for call in analysis.mixing:
        plans.setdefault(call.module, SplitPlan(nodes=opts.nodes, in_assign=call.in_assign, out_assign=call.out_assign,
                                                conv_groups=call.conv_groups, channel_dim=call.channel_dim))
    for name, plan in plans.items():
        to_disco(simulated.get_submodule(name), plan)
    for call in analysis.mixing:
        if call.caller is not None and call.caller != call.module and call.module.startswith(_prefix(call.caller)):
            calling_for(simulated.get_submodule(call.caller), call.module.removeprefix(_prefix(call.caller)))
    setattr(simulated, SPLIT_ATTRIBUTE, ModelSplit(opts.nodes, opts.node_weights, tuple(example.shape[1:]), analysis,
                                                   propagator.captured))
    _check_layers_compute(simulated, example, analysis)
    return set_transport(simulated, opts.transport_dtype)


def _prefix(path: str) -> str:
    return f"{path}." if path else ""


def _check_layers_compute(simulated: nn.Module, example: torch.Tensor, analysis: GraphAnalysis) -> None:
    """Every layer must compute as many calls through its mask as the graph has: a weight read by some other
    module's forward in a way not recognised would otherwise run unmasked."""
    layers = disco_layers(simulated)
    for layer in layers.values():
        layer.intercepted = 0
    with eval_mode(simulated), torch.no_grad():
        simulated(example)
    for name, layer in layers.items():
        calls = sum(call.module == name for call in analysis.mixing)
        if layer.intercepted != calls:
            raise DiscoError(f"layer '{name}' ({layer._plain_type.__name__}) computes {calls} conv/linear call(s) in "
                             f"the graph but its forward made {layer.intercepted}: its weight is used outside its "
                             "own forward, which DISCO cannot mask")


def set_transport(model: nn.Module, transport_dtype: str) -> nn.Module:
    """Make every channel-mixing layer of a partitioned model round what it receives as `transport_dtype` does
    (disco/transport.py); returns the model."""
    get_transport_dtype(transport_dtype)
    for layer in disco_layers(model).values():
        layer.transport = transport_dtype
    return model


def transport_of(model: nn.Module) -> str:
    """The transport dtype a partitioned model simulates."""
    dtypes = {layer.transport for layer in disco_layers(model).values()}
    if len(dtypes) != 1:
        raise DiscoError(f"the model's layers simulate different transport dtypes: {sorted(dtypes)}")
    return dtypes.pop()
