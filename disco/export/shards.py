"""Write one safetensors shard per node plus the manifest (`disco.export`, `disco export`).

Node k's shard holds only what node k computes with: for every channel-mixing layer its output rows,
split into the columns of channels it holds (`weight.local`) and, per sender s, the columns of the
channels s sends it (`weight.from{s}`); the bias of its rows; the entries of per-channel parameters
(BatchNorm) of its channels; and tensors the model reads whole (get_attr, non-per-channel parameters).
Grouped convs keep their rows whole (`weight.grouped`, dropped columns zeroed) because the grouped
kernel needs every column of a group.
"""
from __future__ import annotations

from itertools import chain
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from disco.accounting import cost_report
from disco.errors import DiscoError
from disco.export.manifest import LayerPlan, Manifest, ModelSpec, sha256_of
from disco.transport import transport_dtype
from disco.models import build_for_data
from disco.split.assignment import held_channels
from disco.split.attention import replace_attention
from disco.split.layers import DiscoLayer
from disco.split.partitioner import analyse, as_input_tuple, disco_layers, eval_mode
from disco.split.propagate import GraphAnalysis

PLAN_BUFFERS = ("in_assign", "out_assign", "group_mask")


def sends_table(layer: DiscoLayer) -> list[list[torch.Tensor]]:
    """[src][dst] sorted input channels src sends to dst: kept groups (c -> dst) with c on src."""
    kept = layer.possible_groups() & (layer.group_mask > 0)
    table = []
    for src in range(layer.nodes):
        from_src = layer.in_assign == src
        table.append([(kept[dst] & from_src).nonzero().flatten().cpu() for dst in range(layer.nodes)])
    return table


def mixing_tensors(name: str, layer: DiscoLayer, node: int) -> dict[str, torch.Tensor]:
    rows = (layer.out_assign == node).nonzero().flatten()
    tensors = {}
    if layer.bias is not None:
        tensors[f"{name}.bias"] = layer.bias[rows]
    if layer.conv_groups > 1:
        tensors[f"{name}.weight.grouped"] = layer.masked_weight()[rows]
        return tensors
    weight = layer.weight[rows]
    tensors[f"{name}.weight.local"] = weight[:, held_channels(layer.in_assign, node)]
    for src, row in enumerate(sends_table(layer)):
        if src != node and row[node].numel():
            tensors[f"{name}.weight.from{src}"] = weight[:, row[node].to(weight.device)]
    return tensors


def module_tensors(model: nn.Module, analysis: GraphAnalysis, node: int) -> dict[str, torch.Tensor]:
    """Parameters and buffers of the non-mixing modules the graph calls: per-channel ones sliced."""
    tensors = {}
    for name, channels in analysis.channel_owner_of_module.items():
        module = model.get_submodule(name)
        if channels is not None and hasattr(module, "split_parameters"):  # it knows its own split (per head)
            tensors.update({f"{name}.{key}": t for key, t in module.split_parameters(channels, node).items()})
            continue
        for key, tensor in chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False)):
            qualified = f"{name}.{key}" if name else key
            if channels is not None and tensor.dim() == 1 and tensor.numel() == channels.numel():
                tensors[qualified] = tensor[(channels == node).to(tensor.device)]
            else:
                tensors[qualified] = tensor
    for target in analysis.replicated_attributes | set(analysis.attribute_channels):
        owner, _, attr = target.rpartition(".")
        tensor = getattr(model.get_submodule(owner) if owner else model, attr)
        if target in analysis.attribute_channels:  # split by channel like the data it meets
            channels, dim = analysis.attribute_channels[target]
            tensor = tensor.index_select(dim, (channels == node).nonzero().flatten().to(tensor.device))
        tensors[target] = tensor
    return tensors


def node_tensors(model: nn.Module, analysis: GraphAnalysis, node: int) -> dict[str, torch.Tensor]:
    tensors = module_tensors(model, analysis, node)
    for name, layer in disco_layers(model).items():
        tensors.update(mixing_tensors(name, layer, node))
    # safetensors wants contiguous tensors that share no memory
    return {key: t.detach().cpu().contiguous().clone() for key, t in tensors.items()}


def _layer_plans(model: nn.Module) -> dict[str, LayerPlan]:
    return {name: LayerPlan(in_assign=layer.in_assign.tolist(), out_assign=layer.out_assign.tolist(),
                            sends=[[cols.tolist() for cols in row] for row in sends_table(layer)])
            for name, layer in disco_layers(model).items()}


def check_spec(model: nn.Module, spec: ModelSpec) -> None:
    """The spec must rebuild this architecture: same tensor names and shapes (built on meta: no memory)."""
    with torch.device("meta"):
        rebuilt = replace_attention(build_for_data(spec.model, channels=spec.channels, classes=spec.classes,
                                                   stem_stride=spec.stem_stride, **spec.kwargs))
    expected = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.rpartition(".")[2] not in PLAN_BUFFERS}
    if expected != actual:
        differing = sorted(set(expected.items()) ^ set(actual.items()))[:4]
        raise DiscoError(f"model spec {spec.model!r} does not rebuild the exported model (first differences: "
                         f"{differing}); pass the spec, kwargs, channels and classes it was built with")


def export(model: nn.Module, folder: str | Path, *, example_inputs, spec: ModelSpec, transport_dtype: str = "fp32",
           preprocess: dict | None = None, dataset: dict | None = None,
           class_names: list[str] | None = None, reference: dict | None = None, task: str | None = None) -> Manifest:
    """Write `node{k}.safetensors` for every node and `manifest.json` into `folder` (see module doc).

    `model` is a partitioned model (disco.partition, masks set); `example_inputs` one input like the
    ones it will run on; `spec` rebuilds its architecture on every node. `task` tells node 0 how to read
    the output (default: the model's `disco_task` attribute, as on the disco.tasks models, else
    classification)."""
    layers = disco_layers(model)
    if not layers:
        raise DiscoError("export needs a partitioned model: call disco.partition(model, nodes=N, example_inputs=x)")
    transport_dtype(transport_dtype, runtime=True)  # refuse what the runtime cannot send
    inputs = as_input_tuple(example_inputs)
    if len(inputs) != 1:
        raise DiscoError("the runtime supports models with one input tensor")
    example = inputs[0][:1].cpu()
    model = model.cpu()
    check_spec(model, spec)
    nodes = next(iter(layers.values())).nodes
    with eval_mode(model):
        analysis = analyse(model, (example,), nodes)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for node in range(nodes):
        path = folder / f"node{node}.safetensors"
        safetensors.torch.save_file(node_tensors(model, analysis, node), str(path))
        shards.append({"file": path.name, "sha256": sha256_of(path)})
    costs = cost_report(model, example, transport_dtype=transport_dtype)
    expected = {key: costs[key] for key in ("bytes", "dense_bytes", "ratio", "bytes_matrix", "io_bytes",
                                            "norm_bytes", "norm_bytes_matrix", "macs_per_node",
                                            "param_bytes_per_node")}
    manifest = Manifest(model=spec, nodes=nodes, input_shape=list(example.shape[1:]), transport_dtype=transport_dtype,
                        layers=_layer_plans(model), shards=shards, expected=expected, preprocess=preprocess,
                        dataset=dataset, class_names=class_names, reference=reference,
                        task=task or getattr(model, "disco_task", "classification"))
    manifest.validate()
    manifest.save(folder)
    return manifest
