"""A deployment's model as a graph every rank reads the same way: captured without weights, with the owner of every
value followed from the manifest's plans.

The architecture is rebuilt on the meta device (no weights), captured as a graph (disco/split/capture.py), and the
owner propagation is run with each layer's exported assignment, so every value's layout on every rank is known.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import fx, nn

from disco.errors import DiscoError
from disco.export.manifest import Manifest
from disco.export.trust import build_deployed_model
from disco.models import without_weights
from disco.split.analysis import GraphAnalysis
from disco.split.attention import replace_attention
from disco.split.capture import capture_without_weights, graph_digest, placeholder_values, static_nodes
from disco.split.partitioner import eval_mode
from disco.split.propagate import propagate


class DeploymentGraph:
    """A deployment's model captured and its channel ownership followed with the manifest's plans: the same for
    every rank and every budget level (they share assignments), so ranks of one process build it once. `tensors`: a
    shard (any rank's: the constants whose values the propagation reads, indices, are whole in every shard)."""

    def __init__(self, manifest: Manifest, tensors: dict[str, torch.Tensor], model_code: str | Path | None = None):
        with eval_mode(_meta_model(manifest, model_code)) as meta:
            self.captured, model, example = capture_without_weights(meta, tuple(manifest.input_shape))
        if manifest.graph_digest and graph_digest(self.captured) != manifest.graph_digest:
            raise DiscoError("the model spec captures another graph than the exported model's (other library "
                             "versions?); export again with the versions this node runs")
        self.static = static_nodes(self.captured)
        self.keys = _static_keys(self.captured, self.static)
        provided = {graph_node: tensors[key] for graph_node, key in self.keys.items()
                    if key in tensors and tuple(tensors[key].shape) == tuple(graph_node.meta["val"].shape)}
        values = placeholder_values(self.captured, model, example)
        self.propagator = propagate(self.captured, model, self.static, values, manifest.nodes,
                                    _plan_chooser(manifest.plans), provided=provided, frozen=True)
        self.analysis: GraphAnalysis = self.propagator.analysis
        planned = {call.module for call in self.analysis.mixing}
        if planned != set(manifest.plans):
            raise DiscoError(f"the manifest plans layers the model spec does not call: "
                             f"{sorted(set(manifest.plans) - planned)[:4]}")


def _meta_model(manifest: Manifest, model_code: str | Path | None) -> nn.Module:
    model = without_weights(lambda: build_deployed_model(manifest.model, model_code))
    return replace_attention(model).eval()


def _plan_chooser(plans: dict):
    """The propagation's choice of each layer's output assignment: the one its plan was exported with."""
    def make(overrides):
        def choose(name: str, module: nn.Module, in_assign: torch.Tensor, out_shape, groups: int) -> torch.Tensor:
            plan = plans.get(name)
            if plan is None:
                raise DiscoError(f"the model spec has a layer {name!r} that the manifest does not plan")
            if not torch.equal(plan.in_assign, in_assign.cpu()):
                raise DiscoError(f"layer {name!r} receives its channels on other nodes than the manifest says; the "
                                 "model spec does not rebuild the exported model")
            return plan.out_assign
        return choose
    return make


def _static_keys(captured, static: set[fx.Node]) -> dict[fx.Node, str]:
    """Each static graph node's shard key: a parameter's or buffer's name, `static.<graph node name>` for a computed
    one."""
    keys = {}
    for graph_node in static:
        if graph_node.op == "placeholder":
            keys[graph_node] = captured.roles[graph_node][1]
        elif graph_node.op == "call_function":
            keys[graph_node] = f"static.{graph_node.name}"
    return keys
