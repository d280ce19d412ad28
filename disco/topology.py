"""A deployment's network and devices: how fast each node computes and how fast each pair of nodes talks.

The one description that `disco probe` writes, `disco plan` predicts latency from, and latency-budget training
prices communication groups with (docs/method.md 11). Stored as `topology.json`, in human units:

    {"nodes": [{"name": "jetson", "gmac_per_s": 20.0, "layer_overhead_ms": 0.05}, ...],
     "mbit_per_s": [[null, 1000], [1000, null]],      # from row s to column d (diagonal unused)
     "delay_ms":   [[null, 0.2], [0.2, null]],         # one-way, s to d
     "shared_mbit_per_s": null}                         # a medium every message shares (Wi-Fi, one loopback)

A hand-written file may give each node `uplink_mbit_per_s`, `downlink_mbit_per_s` (default: the uplink's) and
`delay_ms` instead of the matrices: nodes joined by a switch, where s reaches d at min(uplink s, downlink d)
after delay s + delay d. Every value is checked; a message says which node or pair to fix.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from disco.errors import DiscoError
from disco.jsonfile import SMALL_JSON_BYTES, read_json

MBIT = 1e6 / 8  # bytes per second in one Mbit/s


@dataclass(frozen=True)
class NodeSpec:
    """One device: its rate on the model's work, per MAC of its convolutions and linears (the activations,
    pooling and additions around them ride on those MACs), and the fixed time each conv/linear call costs it
    besides its MACs (framework overhead: what makes a 28x28 model slower than its MACs say)."""

    name: str
    macs_per_s: float
    layer_overhead_s: float = 0.0

    def __post_init__(self) -> None:
        _positive(self.macs_per_s / 1e9, f"node '{self.name}': gmac_per_s")
        if not (math.isfinite(self.layer_overhead_s) and self.layer_overhead_s >= 0):
            raise DiscoError(f"node '{self.name}': layer_overhead_ms must be a finite number >= 0, "
                             f"got {self.layer_overhead_s * 1e3!r}")


@dataclass(frozen=True)
class Topology:
    """nodes[k] is rank k. bandwidth[s][d] in bytes/s and delay[s][d] in seconds, for s != d (the diagonal is
    ignored). shared_bandwidth (bytes/s): when every message crosses one medium, what they share, else None."""

    nodes: tuple[NodeSpec, ...]
    bandwidth: tuple[tuple[float, ...], ...]
    delay: tuple[tuple[float, ...], ...]
    shared_bandwidth: float | None = None

    def __post_init__(self) -> None:
        n = len(self.nodes)
        if n < 1:
            raise DiscoError("a topology needs at least one node")
        for what, matrix in (("mbit_per_s", self.bandwidth), ("delay_ms", self.delay)):
            if len(matrix) != n or any(len(row) != n for row in matrix):
                raise DiscoError(f"{what} must be a {n}x{n} matrix (one row and one column per node), "
                                 f"got {[len(row) for row in matrix]}")
        for s in range(n):
            for d in range(n):
                if s == d:
                    continue
                _positive(self.bandwidth[s][d] / MBIT, f"mbit_per_s from node {s} to node {d}")
                if not (math.isfinite(self.delay[s][d]) and self.delay[s][d] >= 0):
                    raise DiscoError(f"delay_ms from node {s} to node {d} must be a finite number >= 0, "
                                     f"got {self.delay[s][d] * 1e3!r}")
        if self.shared_bandwidth is not None:
            _positive(self.shared_bandwidth / MBIT, "shared_mbit_per_s")
        # a node does not send itself anything: one value on the diagonal, whatever the file said
        object.__setattr__(self, "bandwidth", tuple(tuple(math.inf if s == d else v for d, v in enumerate(row))
                                                    for s, row in enumerate(self.bandwidth)))
        object.__setattr__(self, "delay", tuple(tuple(0.0 if s == d else v for d, v in enumerate(row))
                                                for s, row in enumerate(self.delay)))

    @property
    def size(self) -> int:
        return len(self.nodes)

    def check_nodes(self, nodes: int, what: str = "the deployment") -> None:
        if nodes != self.size:
            raise DiscoError(f"{what} is split across {nodes} nodes but the topology describes {self.size}; "
                             f"give one entry per node (rank 0 first)")

    def speeds(self) -> list[float]:
        """Each node's compute rate relative to the fastest: the node weights of a speed-weighted split."""
        fastest = max(node.macs_per_s for node in self.nodes)
        return [node.macs_per_s / fastest for node in self.nodes]

    @classmethod
    def uniform(cls, nodes: int, *, gmac_per_s: float, mbit_per_s: float, delay_ms: float = 0.0,
                layer_overhead_ms: float = 0.0) -> "Topology":
        return cls.from_dict({"nodes": [{"name": f"node{k}", "gmac_per_s": gmac_per_s, "uplink_mbit_per_s": mbit_per_s,
                                         "delay_ms": delay_ms / 2, "layer_overhead_ms": layer_overhead_ms}
                                        for k in range(nodes)]})

    # --- JSON --------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict) -> "Topology":
        if not isinstance(data, dict) or not isinstance(data.get("nodes"), list) or not data["nodes"]:
            raise DiscoError("a topology is a JSON object with a non-empty 'nodes' list (see docs/method.md 11)")
        nodes = tuple(_node(k, entry) for k, entry in enumerate(data["nodes"]))
        entries = data["nodes"]
        if "mbit_per_s" in data:
            bandwidth = _matrix(data["mbit_per_s"], "mbit_per_s", MBIT)
            delay = _matrix(data.get("delay_ms", [[0.0] * len(nodes)] * len(nodes)), "delay_ms", 1e-3)
        else:  # a switch: per-node uplinks, downlinks and delays
            up = [_number(e, "uplink_mbit_per_s", k) * MBIT for k, e in enumerate(entries)]
            down = [_number(e, "downlink_mbit_per_s", k, default=e.get("uplink_mbit_per_s")) * MBIT
                    for k, e in enumerate(entries)]
            one_way = [_number(e, "delay_ms", k, default=0.0) * 1e-3 for k, e in enumerate(entries)]
            n = len(nodes)
            bandwidth = tuple(tuple(min(up[s], down[d]) for d in range(n)) for s in range(n))
            delay = tuple(tuple(one_way[s] + one_way[d] for d in range(n)) for s in range(n))
        shared = data.get("shared_mbit_per_s")
        return cls(nodes, bandwidth, delay, None if shared is None else _as_float(shared, "shared_mbit_per_s") * MBIT)

    def to_dict(self) -> dict:
        n = self.size
        return {"nodes": [{"name": node.name, "gmac_per_s": node.macs_per_s / 1e9,
                           "layer_overhead_ms": node.layer_overhead_s * 1e3} for node in self.nodes],
                "mbit_per_s": [[None if s == d else self.bandwidth[s][d] / MBIT for d in range(n)] for s in range(n)],
                "delay_ms": [[None if s == d else self.delay[s][d] * 1e3 for d in range(n)] for s in range(n)],
                "shared_mbit_per_s": None if self.shared_bandwidth is None else self.shared_bandwidth / MBIT}

    @classmethod
    def load(cls, path: str | Path) -> "Topology":
        path = Path(path)
        if not path.is_file():
            raise DiscoError(f"no topology file at {path}; write one (docs/method.md 11) or measure it with disco probe")
        return cls.from_dict(read_json(path, what="topology", max_bytes=SMALL_JSON_BYTES))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")


SMALLEST_RATE, LARGEST_RATE = 1e-6, 1e9  # Mbit/s and GMAC/s: 1 bit/s .. 1 Pbit/s; 1 kMAC/s .. 1 EMAC/s


def _positive(value: float, what: str) -> None:
    """A rate within bounds: 1e-320 Mbit/s is positive, but a message over it takes infinite time."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and SMALLEST_RATE <= value <= LARGEST_RATE):
        raise DiscoError(f"{what} must be a positive number in [{SMALLEST_RATE:g}, {LARGEST_RATE:g}], got {value!r}")


def _as_float(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DiscoError(f"{what} must be a number, got {value!r}")
    return float(value)


def _number(entry: dict, key: str, index: int, default=None) -> float:
    value = entry.get(key, default)
    if value is None:
        raise DiscoError(f"node {index} has no '{key}': give each node uplink_mbit_per_s (or the whole "
                         "mbit_per_s matrix)")
    return _as_float(value, f"node {index}: {key}")


def _node(index: int, entry) -> NodeSpec:
    if not isinstance(entry, dict):
        raise DiscoError(f"node {index} must be an object with gmac_per_s, got {entry!r}")
    if "gmac_per_s" not in entry:
        raise DiscoError(f"node {index} has no 'gmac_per_s' (its compute rate in GMAC/s; disco probe measures it)")
    return NodeSpec(name=str(entry.get("name", f"node{index}")),
                    macs_per_s=_as_float(entry["gmac_per_s"], f"node {index}: gmac_per_s") * 1e9,
                    layer_overhead_s=_as_float(entry.get("layer_overhead_ms", 0.0),
                                               f"node {index}: layer_overhead_ms") * 1e-3)


def _matrix(rows, what: str, scale: float) -> tuple[tuple[float, ...], ...]:
    if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
        raise DiscoError(f"{what} must be a list of rows (one per node)")
    return tuple(tuple(math.inf if value is None and s == d else _as_float(value, f"{what}[{s}][{d}]") * scale
                       for d, value in enumerate(row)) for s, row in enumerate(rows))
