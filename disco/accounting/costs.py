"""The cost report as types: what `cost_report()` returns, and the part of it a deployment keeps.

`CostReport` has three sections: `traffic` (bytes per image that cross the network), `compute` (MACs per node)
and `memory` (bytes each node holds), plus one `LayerCosts` row per channel-mixing call and one `FallbackCost` per
operation that moved data because no rule split it. `to_json()` is the form users and files read (`disco inspect
--json`, a run's report.json); its keys and their order are the public contract of docs/method.md and did not
change when the dict became a type. `ExpectedCosts` is the part a deployment is checked by and `disco plan`
predicts latency from (manifest.json's `expected`); deployments exported by an older disco lack some of its keys,
which read as zero (they predate norm sums and fallbacks) or, for `layers`, as absent.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

Matrix = list[list[int]]  # [src node, dst node]
SECTIONS = ("traffic", "compute", "memory")  # CostReport's sections, in its JSON order


def _rows(cls, data: dict) -> dict[str, Any]:
    """`data`'s entries named by `cls`'s fields (a JSON form may carry more, e.g. a prediction beside it)."""
    return {f.name: data[f.name] for f in fields(cls) if f.name in data}


@dataclass(frozen=True)
class LayerCosts:
    """One channel-mixing call's costs per image (disco/accounting/layer_cost.py computes them)."""
    name: str
    type: str
    in_channels: int
    out_channels: int
    elements_per_channel: int
    groups_total: int
    groups_kept: int
    dense_bytes: int
    bytes: int
    bytes_matrix: Matrix
    macs_per_node: list[int]
    dense_macs_per_node: list[int]
    # of macs_per_node: those on received channels (after the wait); None: exported before it was kept (all local)
    received_macs_per_node: list[int] | None = None
    conv_groups: int = 1

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "LayerCosts":
        return cls(**_rows(cls, data))


@dataclass(frozen=True)
class FallbackCost:
    """An operation that moved data because no rule split it as its operands lay (`graph_node`: its name in the
    captured graph; `executor`: the node it ran on, None when its operands were only laid out anew)."""
    graph_node: str
    op: str
    executor: int | None
    reason: str
    bytes: int
    macs: int

    def to_json(self) -> dict:
        return {"node": self.graph_node, "op": self.op, "executor": self.executor, "reason": self.reason,
                "bytes": self.bytes, "macs": self.macs}


@dataclass(frozen=True)
class IoBytes:
    """Input scattered from node 0 and output gathered on node 0, per image (always fp32, the same for every
    split: reported apart from the activations' bytes)."""
    input: int
    output: int


@dataclass(frozen=True)
class DtypeBytes:
    bytes: int
    dense_bytes: int


@dataclass(frozen=True)
class Traffic:
    """Bytes per image crossing the network, message by message as the runtime sends them."""
    transport_dtype: str
    bits_per_element: int
    bytes: int  # activations in transport_dtype (integer dtypes: codes plus their (low, step) pairs)
    dense_bytes: int  # the same with every group kept (the dense split)
    ratio: float  # sent elements over the dense split's: the budget
    bytes_matrix: Matrix
    dense_bytes_matrix: Matrix
    bytes_by_dtype: dict[str, DtypeBytes]  # every dtype of disco/transport.py
    groups_total: int
    groups_kept: int
    io_bytes: IoBytes
    norm_bytes: int  # fp32 partial sums of norms and reductions spanning nodes
    norm_bytes_matrix: Matrix
    fallback_bytes: int  # activations moved by fallbacks, in their own dtype
    fallback_bytes_matrix: Matrix


@dataclass(frozen=True)
class Compute:
    macs_per_node: list[int]
    dense_macs_per_node: list[int]
    model_macs: int
    attention_macs_per_node: list[int]  # products between activations, and what fallbacks compute


@dataclass(frozen=True)
class Memory:
    param_bytes_per_node: list[int]
    dense_param_bytes_per_node: list[int]
    model_param_bytes: int
    activation_bytes_per_node: list[int]  # peak of live activations, plus what a node receives for a layer
    memory_bytes_per_node: list[int]  # parameters + peak activations


@dataclass(frozen=True)
class CostReport:
    """Exact per-image costs of a partitioned model (disco/accounting/report.py:cost_report)."""
    nodes: int
    traffic: Traffic
    compute: Compute
    memory: Memory
    layers: tuple[LayerCosts, ...]
    fallbacks: tuple[FallbackCost, ...]

    def to_json(self) -> dict:
        """The JSON form, keys in the contract's order."""
        t, c, m = self.traffic, self.compute, self.memory
        return {
            "nodes": self.nodes, "transport_dtype": t.transport_dtype, "bits_per_element": t.bits_per_element,
            "dense_bytes": t.dense_bytes, "bytes": t.bytes, "ratio": t.ratio, "bytes_matrix": t.bytes_matrix,
            "dense_bytes_matrix": t.dense_bytes_matrix,
            "bytes_by_dtype": {name: asdict(entry) for name, entry in t.bytes_by_dtype.items()},
            "groups_total": t.groups_total, "groups_kept": t.groups_kept,
            "macs_per_node": c.macs_per_node, "dense_macs_per_node": c.dense_macs_per_node,
            "model_macs": c.model_macs, "attention_macs_per_node": c.attention_macs_per_node,
            "param_bytes_per_node": m.param_bytes_per_node, "dense_param_bytes_per_node": m.dense_param_bytes_per_node,
            "model_param_bytes": m.model_param_bytes, "activation_bytes_per_node": m.activation_bytes_per_node,
            "memory_bytes_per_node": m.memory_bytes_per_node, "io_bytes": asdict(t.io_bytes),
            "norm_bytes": t.norm_bytes, "norm_bytes_matrix": t.norm_bytes_matrix, "fallback_bytes": t.fallback_bytes,
            "fallback_bytes_matrix": t.fallback_bytes_matrix, "fallbacks": [f.to_json() for f in self.fallbacks],
            "layers": [layer.to_json() for layer in self.layers],
        }

    def __getitem__(self, key: str):
        """Reading it as the dict it used to be: refused with the attribute to read instead."""
        section = self._section_of(key)
        where = f"{section}.{key}" if section else key
        raise TypeError(f"a CostReport is typed: read report.{where} (or report.to_json()[{key!r}] for its JSON form)")

    def expected(self) -> "ExpectedCosts":
        """What a deployment of this model is checked by and predicted from: its fields, found by name."""
        def value(name: str):
            section = self._section_of(name)
            return getattr(getattr(self, section), name) if section else getattr(self, name)

        return ExpectedCosts(**{f.name: value(f.name) for f in fields(ExpectedCosts)})

    def _section_of(self, key: str) -> str | None:
        """The section holding field `key` (None: a top-level field, or none at all)."""
        return next((section for section in SECTIONS if key in {f.name for f in fields(getattr(self, section))}),
                    None)


@dataclass(frozen=True)
class ExpectedCosts:
    """The cost report's figures a deployment carries (manifest.json's `expected`, the same keys in this order)."""
    nodes: int
    bytes: int
    dense_bytes: int | None  # None (and ratio None): exported by a disco that did not keep them
    ratio: float | None
    bytes_matrix: Matrix
    io_bytes: IoBytes
    norm_bytes: int
    norm_bytes_matrix: Matrix
    fallback_bytes: int
    fallback_bytes_matrix: Matrix
    macs_per_node: list[int]
    attention_macs_per_node: list[int]
    param_bytes_per_node: list[int]
    layers: tuple[LayerCosts, ...] | None  # None: exported by a disco that did not keep per-layer costs

    def to_json(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["io_bytes"] = asdict(self.io_bytes)
        if self.layers is None:
            del data["layers"]
        else:
            data["layers"] = [layer.to_json() for layer in self.layers]
        return data

    @classmethod
    def from_json(cls, data: dict) -> "ExpectedCosts":
        nodes = data["nodes"]
        zeros = [[0] * nodes for _ in range(nodes)]
        layers = data.get("layers")
        return cls(nodes=nodes, bytes=data["bytes"], dense_bytes=data.get("dense_bytes"),
                   ratio=data.get("ratio"), bytes_matrix=data["bytes_matrix"],
                   io_bytes=IoBytes(**data["io_bytes"]), norm_bytes=data.get("norm_bytes", 0),
                   norm_bytes_matrix=data.get("norm_bytes_matrix", zeros),
                   fallback_bytes=data.get("fallback_bytes", 0),
                   fallback_bytes_matrix=data.get("fallback_bytes_matrix", zeros),
                   macs_per_node=data.get("macs_per_node", [0] * nodes),
                   attention_macs_per_node=data.get("attention_macs_per_node", [0] * nodes),
                   param_bytes_per_node=data.get("param_bytes_per_node", [0] * nodes),
                   layers=None if layers is None else tuple(LayerCosts.from_json(row) for row in layers))
