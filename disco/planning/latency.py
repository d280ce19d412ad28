"""Predicted per-image latency of a split model on a topology, from its exact cost report (docs/method.md 11).

The prediction replays what the runtime does (docs/method.md 5 and 8), layer call after layer call:

- rank 0 sends the input to every other rank (fp32);
- at each channel-mixing layer, every rank posts its sends when its input is ready, computes the part of the
  layer on the channels it holds, waits for what it receives, then computes the part on received channels
  (a grouped conv that receives anything waits first and computes everything after);
- at the end every rank sends its output elements to rank 0.

A node's compute takes `layer_overhead + MACs / rate` per layer call (and per received part); the rate is the
whole model's (disco probe), so the activations, pooling and additions around the layers ride on the MACs. A message of b
bytes from s to d starts when posted and when s's uplink, d's downlink (and the shared medium, if any) are free,
occupies them for b / bandwidth[s][d] (b / shared bandwidth on a shared medium, if slower) and arrives `delay`
later. So concurrent messages on one link queue behind each other, as bytes on a wire do.

Every rank's ready time remembers what made it late (its compute, or a message it waited for), so the chain of
those reasons from the last event back to the start is the critical path: where the time goes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from disco.accounting.costs import ExpectedCosts, LayerCosts
from disco.errors import DiscoError
from disco.topology import Topology


@dataclass(frozen=True)
class Segment:
    """One piece of the critical path: `node` computing `layer`, or a transfer on link (src, dst)."""

    kind: str  # "compute" or "transfer"
    layer: str
    seconds: float
    node: int | None = None
    link: tuple[int, int] | None = None

    @property
    def where(self) -> str:
        return f"node {self.node}" if self.kind == "compute" else f"link {self.link[0]}->{self.link[1]}"


@dataclass(frozen=True)
class _Path:
    """A rank's ready time and the chain of segments that made it so (linked, so copies share tails)."""

    time: float
    segment: Segment | None = None
    previous: "_Path | None" = None

    def then(self, segment: Segment, time: float) -> "_Path":
        return _Path(time, segment, self)

    def segments(self) -> list[Segment]:
        found, path = [], self
        while path is not None and path.segment is not None:
            found.append(path.segment)
            path = path.previous
        return found[::-1]


@dataclass
class _Links:
    """When each uplink, downlink and the shared medium are next free; what each carried per image."""

    topology: Topology
    uplink: list[float] = field(default_factory=list)
    downlink: list[float] = field(default_factory=list)
    medium: float = 0.0
    busy: dict = field(default_factory=dict)  # resource -> seconds per image

    def __post_init__(self) -> None:
        self.uplink = [0.0] * self.topology.size
        self.downlink = [0.0] * self.topology.size

    def send(self, src: int, dst: int, size: int, posted: float) -> float:
        """Arrival time of a message of `size` bytes posted at `posted`."""
        topology = self.topology
        seconds = size / topology.bandwidth[src][dst]
        start = max(posted, self.uplink[src], self.downlink[dst])
        if topology.shared_bandwidth is not None:
            seconds = max(seconds, size / topology.shared_bandwidth)
            start = max(start, self.medium)
            self.medium = start + seconds
            self.busy["medium"] = self.busy.get("medium", 0.0) + seconds
        self.uplink[src] = self.downlink[dst] = start + seconds
        for resource in (("up", src), ("down", dst)):
            self.busy[resource] = self.busy.get(resource, 0.0) + seconds
        return start + seconds + topology.delay[src][dst]


@dataclass(frozen=True)
class Prediction:
    latency_s: float
    images_per_s: float  # with enough images in flight: one per time the busiest node or link needs per image
    compute_s_per_node: list[float]  # per image
    critical_path: list[Segment]
    bottleneck: str  # what bounds images/s

    def by_place(self) -> dict[str, float]:
        """Critical-path seconds by node and link, largest first."""
        totals: dict[str, float] = {}
        for segment in self.critical_path:
            totals[segment.where] = totals.get(segment.where, 0.0) + segment.seconds
        return dict(sorted(totals.items(), key=lambda item: -item[1]))

    def by_layer(self, top: int = 10) -> list[Segment]:
        return sorted(self.critical_path, key=lambda s: -s.seconds)[:top]

    def as_dict(self) -> dict:
        return {"latency_ms": self.latency_s * 1e3, "images_per_s": self.images_per_s,
                "compute_ms_per_node": [s * 1e3 for s in self.compute_s_per_node], "bottleneck": self.bottleneck,
                "critical_path_ms": {where: s * 1e3 for where, s in self.by_place().items()},
                "critical_layers": [{"layer": s.layer, "where": s.where, "ms": s.seconds * 1e3}
                                    for s in self.by_layer()]}


def predict(report: ExpectedCosts, topology: Topology) -> Prediction:
    """Per-image latency (batch 1) of a split model whose costs are `report` (a cost report's `expected()`, or a
    deployment's), on `topology`."""
    if report.layers is None:
        raise DiscoError("this deployment's manifest has no per-layer costs (exported by an older disco): export it "
                         "again to predict its latency")
    nodes = report.nodes
    topology.check_nodes(nodes, "the model")
    links = _Links(topology)
    compute = [0.0] * nodes
    paths = _scatter_input(report, topology, links)
    for layer in report.layers:
        paths = _layer(layer, paths, topology, links, compute)
    paths = _attention(report, paths, topology, compute)
    paths = _apart(report, paths, topology, links, compute)
    end = _gather_output(report, paths, links)
    busiest = max([(s, f"node {k} compute") for k, s in enumerate(compute)] +
                  [(s, _resource_name(r)) for r, s in links.busy.items()])
    return Prediction(latency_s=end.time, images_per_s=1.0 / busiest[0] if busiest[0] > 0 else float("inf"),
                      compute_s_per_node=compute, critical_path=end.segments(), bottleneck=busiest[1])


def _resource_name(resource) -> str:
    return "the shared medium" if resource == "medium" else f"node {resource[1]}'s {resource[0]}link"


def _scatter_input(report: ExpectedCosts, topology: Topology, links: _Links) -> list[_Path]:
    nodes = report.nodes
    per_node = report.io_bytes.input // max(nodes - 1, 1)
    start = _Path(0.0)
    paths = [start]
    for k in range(1, nodes):
        arrival = links.send(0, k, per_node, 0.0)
        paths.append(start.then(Segment("transfer", "input", arrival, link=(0, k)), arrival))
    return paths


def _layer(layer: LayerCosts, paths: list[_Path], topology: Topology, links: _Links, compute: list[float]) -> list[_Path]:
    nodes = len(paths)
    sizes = layer.bytes_matrix
    arrivals = [[] for _ in range(nodes)]  # per destination: (arrival, source)
    messages = sorted((paths[src].time, src, dst) for src in range(nodes) for dst in range(nodes)
                      if src != dst and sizes[src][dst] > 0)  # the wires take them in the order they are posted
    for posted, src, dst in messages:
        arrivals[dst].append((links.send(src, dst, sizes[src][dst], posted), src))
    received = layer.received_macs_per_node or [0] * nodes  # (deployments exported before: all local)
    ready = []
    for k in range(nodes):
        node = topology.nodes[k]
        macs, after = layer.macs_per_node[k], received[k]
        if layer.conv_groups > 1 and arrivals[k]:
            after = macs  # a grouped conv assembles its inputs first, then runs once
        local_s = _seconds(node, macs - after) if macs - after > 0 else 0.0
        after_s = _seconds(node, after) if after > 0 else 0.0
        compute[k] += local_s + after_s
        path = paths[k].then(Segment("compute", layer.name, local_s, node=k), paths[k].time + local_s)
        if arrivals[k]:
            arrival, src = max(arrivals[k])
            if arrival > path.time:
                transfer = Segment("transfer", layer.name, arrival - paths[src].time, link=(src, k))
                path = paths[src].then(transfer, arrival)
        if after_s:
            path = path.then(Segment("compute", layer.name + " (received)", after_s, node=k), path.time + after_s)
        ready.append(path)
    return ready


def _seconds(node, macs: int) -> float:
    return node.layer_overhead_s + macs / node.macs_per_s


def _attention(report: ExpectedCosts, paths: list[_Path], topology: Topology, compute: list[float]) -> list[_Path]:
    """Attention's own products (QK^T, AV) happen inside the blocks; counted here, once, per node."""
    ready = []
    for k, path in enumerate(paths):
        macs = report.attention_macs_per_node[k]
        seconds = macs / topology.nodes[k].macs_per_s
        compute[k] += seconds
        ready.append(path.then(Segment("compute", "attention products", seconds, node=k), path.time + seconds)
                     if seconds else path)
    return ready


def _apart(report: ExpectedCosts, paths: list[_Path], topology: Topology, links: _Links, compute: list[float]) -> list[_Path]:
    """Partial sums of norms and reductions, and data moved by fallbacks (docs/method.md 3): they happen between the
    layers; counted here, once, as one exchange every node waits for."""
    nodes = len(paths)
    norms, moved = report.norm_bytes_matrix, report.fallback_bytes_matrix
    sizes = [[norms[s][d] + moved[s][d] for d in range(nodes)] for s in range(nodes)]
    if not any(map(any, sizes)):
        return paths
    total, nothing = sum(map(sum, sizes)), [0] * nodes
    exchange = LayerCosts(name="norms and fallbacks", type="exchange", in_channels=0, out_channels=0,
                          elements_per_channel=0, groups_total=0, groups_kept=0, dense_bytes=total, bytes=total,
                          bytes_matrix=sizes, macs_per_node=nothing, dense_macs_per_node=nothing)
    return _layer(exchange, paths, topology, links, compute)


def _gather_output(report: ExpectedCosts, paths: list[_Path], links: _Links) -> _Path:
    nodes = len(paths)
    per_node = report.io_bytes.output // max(nodes - 1, 1)
    end = paths[0]
    for k in range(1, nodes):
        if per_node:
            arrival = links.send(k, 0, per_node, paths[k].time)
            if arrival > end.time:
                end = paths[k].then(Segment("transfer", "output", arrival - paths[k].time, link=(k, 0)), arrival)
        elif paths[k].time > end.time:
            end = paths[k]
    return end
