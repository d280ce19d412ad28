"""`partition()`: turn a plain model into its simulation-mode DISCO twin."""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager

import torch
from torch import nn

from disco.errors import DiscoError, UnsupportedOperationError
from disco.options import PartitionOptions
from disco.split.assignment import channel_vector
from disco.split.balance import Balancer
from disco.split.layers import DiscoLayer, mixing_kind, to_disco
from disco.split.modules import replace_submodule
from disco.split.plan import SplitPlan
from disco.split.attention import replace_attention
from disco.split.propagate import AssignmentConflict, GraphAnalysis, OutputChooser, propagate, trace
from disco.transport import get_transport_dtype


def as_input_tuple(example_inputs) -> tuple[torch.Tensor, ...]:
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise DiscoError("example_inputs must be a tensor or a tuple of tensors")
    return tuple(inputs)


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


def _chooser(nodes: int, overrides: dict[str, torch.Tensor], weights: tuple[float, ...] | None) -> OutputChooser:
    balancer = Balancer(nodes, weights)

    def choose(name: str, module: nn.Module, in_assign: torch.Tensor, out_shape: torch.Size) -> torch.Tensor:
        if isinstance(module, DiscoLayer):
            if not torch.equal(module.in_assign.cpu(), in_assign):
                raise DiscoError(f"layer '{name}' now receives channels on other nodes than when it was partitioned; "
                                 "partition the model again")
            return module.out_assign.cpu()
        out_channels = module.weight.shape[0]
        macs_per_channel = module.weight[0].numel() * (math.prod(out_shape) // out_channels)
        if name not in balancer.chosen:
            balancer.chosen[name] = _output_assignment(balancer, name, module, in_assign, overrides, macs_per_channel)
            balancer.record(balancer.chosen[name], macs_per_channel)
        return balancer.chosen[name]
    return choose


def _output_assignment(balancer: Balancer, name: str, module: nn.Module, in_assign: torch.Tensor,
                       overrides: dict[str, torch.Tensor], macs_per_channel: int) -> torch.Tensor:
    if name in overrides:
        return overrides[name]
    groups = getattr(module, "groups", 1)
    out_channels = module.weight.shape[0]
    if groups > 1:
        return balancer.grouped(in_assign, groups, out_channels, macs_per_channel * (out_channels // groups))
    block = getattr(module, "disco_channel_block", 1)  # e.g. attention heads: whole blocks on one node
    return balancer.proportional(out_channels // block).repeat_interleave(block)


def analyse(model: nn.Module, inputs: tuple[torch.Tensor, ...], nodes: int,
            overrides: dict[str, torch.Tensor] | None = None, weights: tuple[float, ...] | None = None) -> GraphAnalysis:
    """Trace and run the model once, following channel ownership (see propagate.py); layers not yet split get
    their outputs assigned in proportion to `weights` (balance.py; None: equal)."""
    overrides = {} if overrides is None else overrides
    gm = trace(model)
    while True:  # each conflict fixes one layer's assignment, so this ends after at most #layers rounds
        try:
            with eval_mode(gm):
                return propagate(gm, inputs, nodes, _chooser(nodes, overrides, weights)).analysis
        except AssignmentConflict as conflict:
            _resolve(conflict, conflict.propagator, model, overrides)


def _resolve(conflict: AssignmentConflict, propagator: OwnerPropagator, model: nn.Module,
             overrides: dict[str, torch.Tensor]) -> None:
    """Tensors combined elementwise must share an assignment: re-assign one operand's producing layer."""
    first, second = conflict.operands
    for producer, other in ((second, first), (first, second)):
        source = propagator.sources.get(producer)
        if source is None or source in overrides or isinstance(model.get_submodule(source), DiscoLayer):
            continue
        module = model.get_submodule(source)
        vector = channel_vector(propagator.owners[other], mixing_kind(module).channel_dim)
        if vector is not None and vector.numel() == module.weight.shape[0]:
            overrides[source] = vector
            return
    raise UnsupportedOperationError(conflict.node.name, f"{conflict.node.op} {conflict.node.target}",
                                    "it combines tensors whose channels live on different nodes, and neither "
                                    "operand comes straight from a layer whose assignment could be changed")


def partition(model: nn.Module, *, nodes: int, example_inputs, **options) -> nn.Module:
    """Simulation-mode model: one process computing exactly what `nodes` devices compute together.

    Every conv/linear becomes its Disco twin (same parameters, plus assignments and a group mask with
    every group kept), so the result's outputs equal the original model's until masks are changed.
    `options` are the fields of PartitionOptions other than `nodes`.
    """
    opts = PartitionOptions(nodes=nodes, **options)
    inputs = as_input_tuple(example_inputs)
    simulated = replace_attention(copy.deepcopy(model))
    analysis = analyse(simulated, inputs, opts.nodes, weights=opts.node_weights)
    if not analysis.mixing:
        raise DiscoError(f"{type(model).__name__} has no channel-mixing layer (conv or linear) to split")
    plans: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for call in analysis.mixing:
        previous = plans.setdefault(call.module, (call.in_assign, call.out_assign))
        if not (torch.equal(previous[0], call.in_assign) and torch.equal(previous[1], call.out_assign)):
            raise UnsupportedOperationError(call.node, f"call_module {call.module}",
                                            "this layer is called more than once with channels on different nodes")
    for name, (in_assign, out_assign) in plans.items():
        module = simulated.get_submodule(name)
        plan = SplitPlan(nodes=opts.nodes, in_assign=in_assign, out_assign=out_assign,
                         conv_groups=getattr(module, "groups", 1), channel_dim=mixing_kind(module).channel_dim)
        replace_submodule(simulated, name, to_disco(module, plan))
    return set_transport(simulated, opts.transport_dtype)


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
