"""Write one safetensors shard per node plus the manifest (`disco.export`, `disco export`).

Node k's shard holds only what node k computes with: for every channel-mixing layer the weight blocks its
split plan gives node k (`weight.local`, `weight.remote`, or `weight.grouped`; disco/split/plan.py) and the
bias of its rows; of every other module what disco/split/placement.py places on node k.
"""
from __future__ import annotations

import re
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from disco.accounting import cost_report
from disco.export.budgets import NestedBudgets, NestedExport, level_prefix, levels_table
from disco.errors import DiscoError
from disco.files import write_folder_whole
from disco.export.manifest import DIGEST_KEY, MANIFEST_NAME, NODE_KEY, Manifest, ModelSpec, sha256_of
from disco.export.signing import SIGNATURE_NAME, read_private_key, sign_deployment
from disco.export.trust import deployable_model
from disco.transport import get_transport_dtype
from disco.models import build_for_data, without_weights
from disco.split.attention import replace_attention
from disco.split.layers import DiscoLayer
from disco.split.capture import graph_digest
from disco.split.partitioner import ModelSplit, as_input_tuple, disco_layers, model_split, transport_of
from disco.split.placement import placements
from disco.split.modules import load_norm_statistics

SHARD_NAME = re.compile(r"node\d+\.safetensors")  # what _write names the shards
PLAN_BUFFERS = ("in_assign", "out_assign", "group_mask")


def mixing_tensors(name: str, layer: DiscoLayer, node: int, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The node's weight blocks and bias entries of one channel-mixing layer, as its plan cuts them. `weight`,
    `bias`: as the layer's operation reads them (its parameters, or computed from them: a standardised conv's
    weight, BEiT's bias concatenated from q and v biases)."""
    plan = layer.plan
    tensors = {f"{name}.{block}": block_weight for block, block_weight in plan.weight_blocks(weight, node).items()}
    if bias is not None:
        tensors[f"{name}.bias"] = bias[plan.rows(node).to(bias.device)]
    return tensors


def layer_weights(model: nn.Module, split: ModelSplit) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """{layer: (weight, bias) as its conv/linear reads them}, from the model's current parameters."""
    calls = {call.module: (call.weight, call.bias) for call in split.analysis.mixing}
    values = split.static_values(model, list({name for pair in calls.values() for name in pair if name}))
    return {layer: (values[weight], values[bias] if bias else None) for layer, (weight, bias) in calls.items()}


def node_tensors(model: nn.Module, split: ModelSplit, node: int, parts=None, weights=None) -> dict[str, torch.Tensor]:
    parts = placements(model, split) if parts is None else parts
    weights = layer_weights(model, split) if weights is None else weights
    tensors = {name: placement.part(node) for name, placement in parts.items()}
    for name, layer in disco_layers(model).items():
        tensors.update(mixing_tensors(name, layer, node, *weights[name]))
    return {key: _storable(t) for key, t in tensors.items()}


def _storable(tensor: torch.Tensor) -> torch.Tensor:
    """safetensors wants contiguous CPU tensors that share no memory."""
    return tensor.detach().cpu().contiguous().clone()


def check_spec(model: nn.Module, spec: ModelSpec) -> None:
    """The spec must rebuild this architecture: same tensor names and shapes (built on meta: no memory)."""
    rebuilt = replace_attention(without_weights(lambda: build_for_data(
        spec.model, channels=spec.channels, classes=spec.classes, stem_stride=spec.stem_stride, **spec.kwargs)))
    expected = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.rpartition(".")[2] not in PLAN_BUFFERS}
    if expected != actual:
        differing = sorted(set(expected.items()) ^ set(actual.items()))[:4]
        raise DiscoError(f"model spec {spec.model!r} does not rebuild the exported model (first differences: "
                         f"{differing}); pass the spec, kwargs, channels and classes it was built with")


def export(model: nn.Module, folder: str | Path, *, example_inputs, spec: ModelSpec, transport_dtype: str | None = None,
           preprocess: dict | None = None, dataset: dict | None = None,
           class_names: list[str] | None = None, reference: dict | None = None, task: str | None = None,
           sign_key: str | Path | None = None, nested: NestedExport | None = None) -> Manifest:
    """Write `node{k}.safetensors` for every node and `manifest.json` into `folder` (see module doc).

    `model` is a partitioned model (disco.partition, masks set); `example_inputs` one input like the
    ones it will run on; `spec` rebuilds its architecture on every node. `transport_dtype`: what channels cross
    the network in (default: the one the model simulates, disco.set_transport). `task` tells node 0 how to read
    the output (default: the model's `disco_task` attribute, as on the disco.tasks models, else
    classification). `sign_key`: an Ed25519 private key file (`disco keygen`) to sign the deployment with.
    `nested`: the budgets of a model trained with nested budgets, all carried by the one deployment
    (disco/export/budgets.py; the model is left at the largest, and `reference` is taken from `nested`)."""
    layers = disco_layers(model)
    if not layers:
        raise DiscoError("export needs a partitioned model: call disco.partition(model, nodes=N, example_inputs=x)")
    dtype = get_transport_dtype(transport_dtype or transport_of(model))
    if sign_key is not None:
        read_private_key(sign_key)  # a bad key is refused before anything is written
    example, model = _one_example(example_inputs), model.cpu()
    check_spec(model, spec)
    split = model_split(model, example)  # analysed once: the costs, placements and shards all read it
    nested_field, level_tensors = None, [{} for _ in range(split.nodes)]
    if nested is not None:  # (it leaves the model at level 0, the largest budget: what the shards hold)
        nested_field, level_tensors = _levels(model, split, example, dtype.name, nested)
        expected, reference = nested_field["expected"][nested.default], nested.reference[nested.default]
    parts = placements(model, split)
    if nested is None:
        expected = cost_report(model, example, transport_dtype=dtype.name, split=split, parts=parts).expected()
        expected = expected.to_json()
    manifest = Manifest(model=deployable_model(spec), nodes=split.nodes,
                        input_shape=list(example.shape[1:]), transport_dtype=dtype.name, transport_scheme=dtype.scheme,
                        plans={name: layer.plan for name, layer in layers.items()}, shards=[], expected=expected,
                        preprocess=preprocess, dataset=dataset, class_names=class_names, reference=reference,
                        task=task or getattr(model, "disco_task", "classification"), nested=nested_field,
                        graph_digest=graph_digest(split.captured))
    def write(staging: Path) -> None:
        _write(model, staging, manifest, split, parts, level_tensors)
        if sign_key is not None:
            sign_deployment(staging, sign_key)

    # a kill while exporting over a deployment leaves the old one or the new one whole
    write_folder_whole(Path(folder), write, replaceable=_only_a_deployment, what="deployment folder")
    return manifest


def _only_a_deployment(folder: Path) -> bool:
    """A previous export (its manifest, shards and signature, nothing else): replacing it deletes nothing else."""
    names = {path.name for path in folder.iterdir()}
    return MANIFEST_NAME in names and all(name in (MANIFEST_NAME, SIGNATURE_NAME) or SHARD_NAME.fullmatch(name)
                                          for name in names)


def _one_example(example_inputs) -> torch.Tensor:
    inputs = as_input_tuple(example_inputs)
    if len(inputs) != 1:
        raise DiscoError("the runtime supports models with one input tensor")
    return inputs[0][:1].cpu()


def _write(model: nn.Module, folder: Path, manifest: Manifest, split: ModelSplit, parts: dict,
           level_tensors: list[dict[str, torch.Tensor]]) -> None:
    """Every node's shard, bound to the manifest's digest, then the manifest (and no stale signature)."""
    digest = manifest.digest()  # of everything but the shard list: bound into every shard
    weights = layer_weights(model, split)
    for node in range(split.nodes):
        path = folder / f"node{node}.safetensors"  # (SHARD_NAME)
        # serialised first: a full disk is then an OSError (write_folder_whole's clear error), not safetensors' own
        path.write_bytes(safetensors.torch.save({**node_tensors(model, split, node, parts, weights),
                                                 **level_tensors[node]}, metadata={DIGEST_KEY: digest,
                                                                                   NODE_KEY: str(node)}))
        manifest.shards.append({"file": path.name, "sha256": sha256_of(path), "bytes": path.stat().st_size})
    manifest.validate()
    manifest.save(folder)


def _levels(model: nn.Module, split: ModelSplit, example: torch.Tensor, dtype: str,
            nested: NestedExport) -> tuple[dict, list[dict[str, torch.Tensor]]]:
    """The manifest's `nested` field and each node's tensors of levels >= 1 (their BatchNorm statistics): every
    level's masks and statistics set in turn, smallest first, so the model is left at level 0, the largest."""
    layers, nodes = disco_layers(model), split.nodes
    if set(nested.group_levels) != set(layers):
        raise DiscoError("the nested levels do not name this model's layers: they belong to another run")
    expected: list[dict] = []
    per_node: list[dict[str, torch.Tensor]] = [{} for _ in range(nodes)]
    for level in reversed(range(len(nested.budgets))):
        for name, layer in layers.items():
            layer.set_group_mask(nested.group_levels[name] > level)
        load_norm_statistics(model, nested.norms[level])
        parts = placements(model, split)
        expected.insert(0, cost_report(model, example, transport_dtype=dtype, split=split, parts=parts).expected()
                        .to_json())
        for node in range(nodes) if level else ():
            per_node[node].update({level_prefix(level) + key: _storable(parts[key].part(node))
                                   for key in nested.norms[level] if key in parts})
    table = {name: levels_table(layer.plan, nested.group_levels[name]) for name, layer in layers.items()}
    field = NestedBudgets(budgets=list(nested.budgets), levels=table, expected=expected,
                          reference=list(nested.reference), default=nested.default)
    return field.to_json(), per_node
