"""`cost_report()`: exact per-image communication, compute and memory of a partitioned model."""
from __future__ import annotations

import torch
from torch import nn

from disco.accounting.costs import Compute, CostReport, DtypeBytes, FallbackCost, IoBytes, Memory, Traffic
from disco.accounting.layer_cost import LayerCost, layer_cost, layer_param_elements
from disco.errors import DiscoError
from disco.transport import IO_DTYPE, TRANSPORT_DTYPES, TransportDtype, get_transport_dtype
from disco.split.analysis import GraphAnalysis
from disco.split.layers import DiscoLayer
from disco.split.partitioner import ModelSplit, disco_layers, model_split
from disco.split.placement import placements


def _param_bytes(model: nn.Module, layers: dict[str, DiscoLayer], split: ModelSplit, parts: dict | None):
    """([nodes] kept, [nodes] dense) parameter bytes: mixing layers' weights as their plans place them, the other
    tensors operations read as disco/split/placement.py places them (those computed from parameters)."""
    nodes = split.nodes
    kept, dense = torch.zeros(nodes, dtype=torch.long), torch.zeros(nodes, dtype=torch.long)
    for layer in layers.values():
        layer_kept, layer_dense = layer_param_elements(layer)
        kept += layer_kept * layer.weight.element_size()
        dense += layer_dense * layer.weight.element_size()
    for placement in (placements(model, split) if parts is None else parts).values():
        if placement.is_parameter:
            share = placement.elements_per_node(nodes) * placement.tensor.element_size()
            kept += share
            dense += share
    return kept, dense


def _product_macs(analysis: GraphAnalysis, nodes: int) -> torch.Tensor:
    """[nodes] MACs of products between activations (attention's QK^T and AV, other contractions), each output
    element's on the node holding it, plus what fallbacks compute on the node they run on."""
    macs = torch.zeros(nodes, dtype=torch.long)
    for products in analysis.products:
        macs += torch.tensor(products.macs_per_node, dtype=torch.long)
    for fallback in analysis.fallbacks:
        macs[fallback.executor] += fallback.macs
    return macs


NORM_STATISTIC_BYTES = 4  # partial sums of norms and reductions always travel as fp32: they need the precision


def norm_bytes_matrix(analysis: GraphAnalysis, nodes: int) -> torch.Tensor:
    """[src, dst] bytes per image of the partial results of norms and reductions over elements that span nodes
    (LayerNorm's (sum x, sum x^2) per position between the nodes holding its channels, docs/method.md 3)."""
    matrix = torch.zeros(nodes, nodes, dtype=torch.long)
    for exchange in analysis.exchanges:
        matrix += exchange.values * NORM_STATISTIC_BYTES
    return matrix


def fallback_bytes_matrix(analysis: GraphAnalysis, nodes: int) -> torch.Tensor:
    """[src, dst] bytes per image of activations moved to another layout: gathered for operations that run on one
    node and split again after, or laid out as an operation needs (always in the activation's own dtype)."""
    matrix = torch.zeros(nodes, nodes, dtype=torch.long)
    for move in analysis.redistributions:
        matrix += move.elements * move.element_size
    return matrix


def fallback_entries(analysis: GraphAnalysis) -> tuple[FallbackCost, ...]:
    """Every operation that moved data because no rule split it as its operands lay, with its bytes and MACs."""
    entries: dict[str, dict] = {}
    for move in analysis.redistributions:
        entry = entries.setdefault(move.graph_node, {"graph_node": move.graph_node, "op": "", "executor": None,
                                               "reason": move.reason, "bytes": 0, "macs": 0})
        entry["bytes"] += int(move.elements.sum()) * move.element_size
    for fallback in analysis.fallbacks:
        entry = entries.setdefault(fallback.graph_node, {"graph_node": fallback.graph_node, "bytes": 0})
        entry.update(op=fallback.op, executor=fallback.executor, reason=fallback.reason, macs=fallback.macs)
    return tuple(FallbackCost(**entry) for entry in entries.values())


def _peak_activation_bytes(analysis: GraphAnalysis, costs: list[LayerCost], calls_index: list[int],
                           element_size: int, nodes: int) -> list[int]:
    """Peak bytes of live activations per node, walking the graph in order (each value lives from its
    producer to its last user) plus the channels a node receives for the layer it is computing."""
    if not analysis.values:
        return [0] * nodes
    starts = torch.tensor([v.index for v in analysis.values])
    ends = torch.tensor([v.last_use for v in analysis.values])
    sizes = torch.tensor([[e * v.element_size for e in v.elements_per_node] for v in analysis.values])
    received = {index: cost.elements_matrix.sum(0) * element_size for index, cost in zip(calls_index, costs)}
    peak = torch.zeros(nodes, dtype=torch.long)
    for step in torch.unique(torch.cat([starts, ends])).tolist():
        live = ((starts <= step) & (ends >= step)).to(sizes.dtype)
        held = live @ sizes + received.get(step, 0)
        peak = torch.maximum(peak, held)
    return peak.tolist()


def _bytes_matrix(costs: list[LayerCost], dtype: TransportDtype, nodes: int, dense: bool = False) -> torch.Tensor:
    return sum((c.bytes_matrix(dtype, dense) for c in costs), torch.zeros(nodes, nodes, dtype=torch.long))


def _matrices_by_dtype(costs: list[LayerCost], nodes: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{dtype name: ([src, dst] kept bytes, [src, dst] dense bytes)} per image, every dtype of the table."""
    return {name: (_bytes_matrix(costs, d, nodes), _bytes_matrix(costs, d, nodes, dense=True))
            for name, d in TRANSPORT_DTYPES.items()}


def cost_report(model: nn.Module, example_inputs, *, transport_dtype: str = "fp32", split: ModelSplit | None = None,
                parts: dict | None = None) -> CostReport:
    """Per-image costs of a partitioned model on inputs shaped like `example_inputs` (`.to_json()`: its JSON form).

    Bytes are activations crossing the network in `transport_dtype`, message by message as the runtime sends
    them (integer dtypes: codes plus their (low, step) pairs, disco/transport.py); `io_bytes` (input scattered
    from node 0, output gathered on node 0, always fp32) and `norm_bytes` (fp32 partial sums of LayerNorms
    spanning nodes) are reported separately. `ratio` is sent elements over the dense split's (the budget). MACs
    count conv/linear weights a node holds in kept slices plus the attention products of its heads; parameter
    bytes are those weights plus per-channel parameters (BatchNorm, LayerNorm, per-head tables).
    `split`, `parts`: the model's split and placements when the caller has them already (export), so the model
    is analysed once.
    """
    dtype = get_transport_dtype(transport_dtype)
    layers = disco_layers(model)
    if not layers:
        raise DiscoError("cost_report needs a partitioned model: call disco.partition(model, nodes=N, "
                         "example_inputs=x) first")
    split = split or model_split(model, example_inputs)
    costs = [layer_cost(layers[call.module], call, split.analysis.batch) for call in split.analysis.mixing]
    compute = _compute(costs, split.analysis, split.nodes)
    return CostReport(nodes=split.nodes, traffic=_traffic(costs, split.analysis, dtype, split.nodes),
                      compute=compute, memory=_memory(model, layers, split, costs, parts),
                      layers=tuple(c.costs(dtype) for c in costs), fallbacks=fallback_entries(split.analysis))


def _traffic(costs: list[LayerCost], analysis: GraphAnalysis, dtype: TransportDtype, nodes: int) -> Traffic:
    elements = int(sum(c.elements_matrix for c in costs).sum())
    dense_elements = int(sum(c.dense_elements_matrix for c in costs).sum())
    by_dtype = _matrices_by_dtype(costs, nodes)
    kept_bytes, dense_bytes = by_dtype[dtype.name]
    io_bytes_per_element = IO_DTYPE.bits // 8
    norms, moved = norm_bytes_matrix(analysis, nodes), fallback_bytes_matrix(analysis, nodes)
    return Traffic(
        transport_dtype=dtype.name, bits_per_element=dtype.bits, bytes=int(kept_bytes.sum()),
        dense_bytes=int(dense_bytes.sum()), ratio=elements / dense_elements if dense_elements else 0.0,
        bytes_matrix=kept_bytes.tolist(), dense_bytes_matrix=dense_bytes.tolist(),
        bytes_by_dtype={name: DtypeBytes(int(kept.sum()), int(dense.sum())) for name, (kept, dense) in by_dtype.items()},
        groups_total=sum(c.groups_total for c in costs), groups_kept=sum(c.groups_kept for c in costs),
        io_bytes=IoBytes(
            input=analysis.input_elements * io_bytes_per_element * (nodes - 1),
            output=(analysis.output_elements - analysis.output_elements_per_node[0]) * io_bytes_per_element),
        norm_bytes=int(norms.sum()), norm_bytes_matrix=norms.tolist(),
        fallback_bytes=int(moved.sum()), fallback_bytes_matrix=moved.tolist())


def _compute(costs: list[LayerCost], analysis: GraphAnalysis, nodes: int) -> Compute:
    attention_macs = _product_macs(analysis, nodes)
    macs = torch.tensor([c.macs_per_node for c in costs]).sum(0) + attention_macs
    dense_macs = torch.tensor([c.dense_macs_per_node for c in costs]).sum(0) + attention_macs
    return Compute(macs_per_node=macs.tolist(), dense_macs_per_node=dense_macs.tolist(),
                   model_macs=int(dense_macs.sum()), attention_macs_per_node=attention_macs.tolist())


def _memory(model: nn.Module, layers: dict[str, DiscoLayer], split: ModelSplit, costs: list[LayerCost],
            parts: dict | None) -> Memory:
    params, dense_params = _param_bytes(model, layers, split, parts)
    element_size = next(iter(layers.values())).weight.element_size()  # activations share the weights' dtype
    activations = _peak_activation_bytes(split.analysis, costs, [call.index for call in split.analysis.mixing],
                                         element_size, split.nodes)
    return Memory(param_bytes_per_node=params.tolist(), dense_param_bytes_per_node=dense_params.tolist(),
                  model_param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
                  activation_bytes_per_node=activations,
                  memory_bytes_per_node=[int(p) + a for p, a in zip(params.tolist(), activations)])


def share_over_weight(per_node: list[float], weights: tuple[float, ...] | None = None) -> list[float]:
    """Each node's share of a total (MACs, parameter bytes) over its weight's share: 1.0 is exactly its share,
    1.5 half as much again as it should do (docs/method.md 2, "Node weights")."""
    weights = weights or (1.0,) * len(per_node)
    total, weight_total = sum(per_node), sum(weights)
    return [(value / total) / (weight / weight_total) if total else 1.0 for value, weight in zip(per_node, weights)]
