"""One rank of `disco probe`: `torchrun --nproc-per-node N -m disco.runtime.probe DEPLOY --out topology.json`.

Measures what disco/topology.py describes, as the deployment will use it, and rank 0 writes it:

1. Compute, every rank at once (after a barrier: ranks sharing a host contend as they will in a run): the
   deployment's model with random weights, BatchNorms folded into their convs (as disco/runtime/fusion.py folds
   them), batch 1, the rank's threads. Every conv/linear call is timed alone on the input it got in one
   forward, and time_i = o + MACs_i / r is fitted over the calls; o is the node's layer_overhead. Its rate is
   the whole forward's: M / (T - L * o) for a forward of T seconds, M MACs and L calls (at most r), so that
   L * o + M / rate reproduces T (activations, pooling and additions ride on the MACs).
2. Each ordered pair (s, d), one at a time while the others wait at a barrier: the delay and the bandwidth.
3. Two flows at once (0 -> 1 and 2 -> 3, or both ways between 0 and 1): whether the nodes share one medium.

All messages go through disco/runtime/comm.py (category "control"), so a dead or silent peer ends every rank
within --timeout with an error naming it.
"""
from __future__ import annotations

import argparse
import math
import os
import socket
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from disco.runtime.options import ProbeOptions, check_out
from disco.errors import DiscoError
from disco.export.manifest import MANIFEST_NAME, Manifest, sha256_of
from disco.export.trust import build_deployed_model
from disco.fields import add_options, from_args
from disco.runtime.comm import (Comm, DistComm, barrier, broadcast, choose_backend, gather, launch_environment,
                                tiny_message)
from disco.runtime.worker import pin_to_own_cores, report_failure
from disco.split.attention import replace_attention
from disco.topology import MBIT, NodeSpec, Topology

LAYER_REPEATS, LAYER_BUDGET_S = 7, 0.2  # per layer call: at most 7 timed runs, none started after 0.2 s
MODEL_REPEATS, MODEL_BUDGET_S = 7, 2.0  # the whole forward
PINGS = 20  # round trips of a tiny message per pair (after 2 untimed)
FIRST_BYTES, LARGEST_BYTES = 256 << 10, 64 << 20  # bandwidth messages: doubling from 256 KiB, at most 64 MiB
LONG_ENOUGH_S = 0.1  # ... until one transfer takes this long
TIMINGS = 3  # transfers per size for the sizes the bandwidth is computed from (median)
HOST_BYTES = 64


# --- compute ---------------------------------------------------------------------------------------------------
@dataclass
class Compute:
    macs_per_s: float
    overhead_s: float  # the fit's o: what each conv/linear call costs beside its MACs when timed alone
    calls_rate: float  # the fit's r: MAC/s of the calls timed alone (macs_per_s is the whole forward's)
    model_s: float  # the whole forward T (median)
    macs: int  # M: MACs of every conv/linear call
    calls: int  # L


def mixing_macs(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """MACs of one call at the batch it got: a conv's output elements x input channels per group x kernel
    elements (a transposed conv's input elements x output channels per group x kernel elements); a linear's
    output elements (tokens x out features) x in features."""
    if isinstance(module, nn.Linear):
        return y.numel() * module.in_features
    kernel = math.prod(module.kernel_size)
    if module.transposed:
        return x.numel() * (module.out_channels // module.groups) * kernel
    return y.numel() * (module.in_channels // module.groups) * kernel


def build_model(manifest: Manifest, model_code: str | None) -> nn.Module:
    """The deployment's architecture with random weights, as the runtime runs it: attention with separate q/k/v
    linears (the runtime's split attention), eval, each BatchNorm that only a conv feeds folded into it. A model
    torch.fx cannot trace is timed unfolded (its BatchNorms then count as overhead)."""
    model = replace_attention(build_deployed_model(manifest.model, model_code)).eval()
    from torch.fx.experimental.optimization import fuse
    try:
        return fuse(model, inplace=True).eval()
    except Exception:  # noqa: BLE001 - fx raises many types; folding is an optimisation, not a requirement
        return model


def median_time(call, repeats: int, budget_s: float) -> float:
    """Median seconds of `call()` over up to `repeats` runs, none started after `budget_s`, after one untimed run
    (oneDNN picks its kernels on the first)."""
    call()
    times: list[float] = []
    while len(times) < repeats and sum(times) < budget_s:
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def fit_rate(macs: list[int], times: list[float]) -> tuple[float, float]:
    """(o, r) of time = o + macs / r by least squares, with o >= 0 (refitted through the origin when the free fit
    puts it below 0, or when MACs do not explain the times at all: then r is what the calls give on average)."""
    n = len(macs)
    mean_m, mean_t = sum(macs) / n, sum(times) / n
    spread = sum((m - mean_m) ** 2 for m in macs)
    slope = sum((m - mean_m) * (t - mean_t) for m, t in zip(macs, times)) / spread if spread > 0 else 0.0
    intercept = mean_t - slope * mean_m
    if slope <= 0 or intercept < 0:
        intercept = 0.0
        slope = sum(m * t for m, t in zip(macs, times)) / sum(m * m for m in macs)
    return intercept, 1.0 / slope


def probe_compute(manifest: Manifest, model_code: str | None) -> Compute:
    model = build_model(manifest, model_code)
    x = torch.randn(1, *manifest.input_shape)
    calls: list[tuple[nn.Module, torch.Tensor, int]] = []

    def record(module, args, output):
        calls.append((module, args[0].detach().clone(), mixing_macs(module, args[0], output)))

    mixing = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    hooks = [m.register_forward_hook(record) for m in mixing]
    with torch.no_grad():
        model(x)  # one pass: every conv/linear call's input
        for hook in hooks:
            hook.remove()
        if not calls:
            raise DiscoError("the deployment's model calls no conv or linear layer: nothing to fit a rate to")
        times = [median_time(lambda: module(inputs), LAYER_REPEATS, LAYER_BUDGET_S) for module, inputs, _ in calls]
        model_s = median_time(lambda: model(x), MODEL_REPEATS, MODEL_BUDGET_S)
    macs = [m for _, _, m in calls]
    intercept, rate = fit_rate(macs, times)
    total = sum(macs)
    # The whole forward takes longer than its calls timed alone (activations, pooling, additions; on a CPU quota,
    # the throttling a long run meets and a short call does not): the node's rate is the whole forward's, its MACs
    # over what the forward takes beyond the per-call overheads. Counting the rest per MAC of the node's dense
    # share instead predicted the edge rows 83% too slow (docs/results/uneven).
    beyond = model_s - len(calls) * intercept
    whole_rate = total / beyond if beyond > 0 else rate
    return Compute(min(rate, whole_rate), intercept, rate, model_s, total, len(calls))


# --- network -------------------------------------------------------------------------------------------------
def measure_delay(comm: Comm, peer: int, sender: bool) -> float | None:
    """The sender's median round trip of a one-float message to `peer` and back, halved (one way)."""
    what = f"timing the round trip to rank {peer}"
    trips = []
    for index in range(PINGS + 2):
        began = time.perf_counter()
        if sender:
            comm.send(tiny_message(), peer, category="control", what=what)
            comm.receive((1,), torch.float32, peer, what=what)
        else:
            comm.receive((1,), torch.float32, peer, what=what)
            comm.send(tiny_message(), peer, category="control", what=what)
        if index >= 2:  # the first two set up the pair's connection and buffers
            trips.append(time.perf_counter() - began)
    return statistics.median(trips) / 2 if sender else None


def measure_bandwidth(comm: Comm, peer: int, delay: float) -> float:
    """Sender side: bytes/s from this rank to `peer`.

    Each transfer is a ping-pong of the big message against a tiny ack, timed by the sender (one clock, no
    need to agree on when a transfer started): time = delay + bytes / rate + the ack's delay + the per-message
    cost of both ends. The sizes double from 256 KiB until one transfer takes 0.1 s (at most 64 MiB). The rate
    is then the marginal one between the last two sizes, (B2 - B1) / (t2 - t1) (median of 3 transfers each):
    what a transfer costs regardless of its size cancels out, not only the delays but a shaper's burst (tc
    tbf lets 256 kB through at once: 1 MiB over a 40 Mbit/s link timed whole would read 53 Mbit/s) and TCP's
    slow start. When the larger one is no slower (timer noise on a fast link) it falls back to B2 / (t2 - 2
    delay)."""
    what = f"measuring the bandwidth to rank {peer}"
    payload = torch.zeros(LARGEST_BYTES // 4)

    def transfer(size: int) -> float:
        comm.send(torch.tensor([size // 4]), peer, category="control", what=what)  # tells the peer what comes
        began = time.perf_counter()
        comm.send(payload[:size // 4], peer, category="control", what=what)
        comm.receive((1,), torch.float32, peer, what=what)  # the ack
        return time.perf_counter() - began

    size = FIRST_BYTES
    while transfer(size) < LONG_ENOUGH_S and size < LARGEST_BYTES:
        size *= 2
    # timed afresh: the first transfer of a size is often slower (measured: 201 ms, then 89 and 101 ms, for
    # 64 MiB over loopback), so the search's own transfers only choose the sizes
    small, large = size // 2, size
    timed: dict[int, list[float]] = {small: [], large: []}
    for _ in range(TIMINGS):
        for each in (small, large):
            timed[each].append(transfer(each))
    comm.send(torch.tensor([0]), peer, category="control", what=what)  # done
    t_small, t_large = statistics.median(timed[small]), statistics.median(timed[large])
    if t_large > t_small:
        return (large - small) / (t_large - t_small)
    return large / max(t_large - 2 * delay, t_large / 2)


def serve_bandwidth(comm: Comm, peer: int) -> None:
    """Receiver side of measure_bandwidth: take each announced message, answer with the ack."""
    what = f"measuring the bandwidth from rank {peer}"
    while True:
        count = int(comm.receive((1,), torch.int64, peer, what=what)[0])
        if count == 0:
            return
        comm.receive((count,), torch.float32, peer, what=what)
        comm.send(tiny_message(), peer, category="control", what=what)


def measure_pairs(comm: Comm) -> tuple[list[float], list[float]]:
    """This rank's row of the matrices: (bytes/s to each rank, one-way delay s to each rank); its own entries
    are inf and 0 (unused). One ordered pair at a time; every rank goes through every pair's barrier."""
    bandwidth, delay = [math.inf] * comm.world, [0.0] * comm.world
    for s in range(comm.world):
        for d in range(comm.world):
            if s == d:
                continue
            barrier(comm, f"waiting for the link {s}->{d} to be measured")
            if comm.rank == s:
                delay[d] = measure_delay(comm, d, sender=True)
                bandwidth[d] = measure_bandwidth(comm, d, delay[d])
            elif comm.rank == d:
                measure_delay(comm, s, sender=False)
                serve_bandwidth(comm, s)
    return bandwidth, delay


def shared_size(pair_rate: float) -> int:
    """Bytes each flow of the two-flows test sends: what takes 0.1 s at a pair's rate (power of
    two, 256 KiB to 32 MiB: the test also sends twice that)."""
    size = FIRST_BYTES
    while size < LARGEST_BYTES // 2 and size < pair_rate * LONG_ENOUGH_S:
        size *= 2
    return size


def two_flows(world: int) -> list[tuple[int, int]]:
    """The two-flows test's (src, dst) flows: 0 -> 1 and 2 -> 3 with four nodes or more (separate connections,
    separate wires on a switch), else 0 -> 1 and 1 -> 0 (one connection: on a shaped link each direction's
    acknowledgements queue behind the other's data, which can slow both)."""
    return [(0, 1), (2, 3)] if world >= 4 else [(0, 1), (1, 0)]


def _shared_medium(flow_rates: list[float], together_s: float, size: int) -> float | None:
    """The shared medium's bytes/s, or None. On a switch (full duplex) the two flows use different wires, so
    together they take as long as the slower alone; on one medium (Wi-Fi, a hub, the one loopback of a host) they
    take turns, so together they take the sum of their times alone. Nearer the sum than the slower one: a shared
    medium, whose rate is what both moved. (All pairs at once was tried first: on a switch with one slow node,
    its links finish last and look like a shared medium.)"""
    alone = [size / rate for rate in flow_rates]
    if together_s > (max(alone) + sum(alone)) / 2:
        return 2 * size / together_s
    return None


def measure_both_ways(comm: Comm, size: int) -> float | None:
    """Rank 0: seconds the two flows (two_flows) take together for `size` bytes each: each sends `size`, then
    2 x `size` bytes at the same time (the other ranks wait); marginal between the two sizes as in
    measure_bandwidth. A transfer's time is the slower rank's, from the barrier to its last receive."""
    payload = torch.zeros(2 * size // 4)
    timed: dict[int, list[float]] = {size: [], 2 * size: []}
    for _ in range(TIMINGS):
        for each in timed:
            barrier(comm, "waiting to send two flows at once")
            began = time.perf_counter()
            flows = two_flows(comm.world)
            sends = [d for src, d in flows if src == comm.rank]
            receives = [src for src, d in flows if d == comm.rank]
            if sends or receives:
                comm.exchange({peer: payload[:each // 4] for peer in sends},
                              {peer: ((each // 4,), torch.float32) for peer in receives}, category="control",
                              what="sending two flows at once").wait()
            elapsed = torch.tensor([time.perf_counter() - began], dtype=torch.float64)
            times = gather(comm, elapsed, "collecting the both-ways times")
            if times is not None:
                timed[each].append(max(float(t) for t in times.values()))
    if comm.rank != 0:
        return None
    t_small, t_large = statistics.median(timed[size]), statistics.median(timed[2 * size])
    return t_large - t_small if t_large > t_small else t_large / 2  # seconds for `size` more bytes per flow


def _host_bytes() -> torch.Tensor:
    name = socket.gethostname().encode()[:HOST_BYTES]
    return torch.tensor(list(name.ljust(HOST_BYTES, b"\0")), dtype=torch.uint8)


def _host_name(data: torch.Tensor) -> str:
    return bytes(data.tolist()).rstrip(b"\0").decode(errors="replace")


# --- the rank ------------------------------------------------------------------------------------------------
@dataclass
class Probe:
    topology: Topology
    computes: list[Compute]
    hosts: list[str]
    flow_rates: list[float] | None  # bytes/s of the two-flows test's flows alone (None: one node, no links)
    together_s: float | None  # seconds they took together for `size` bytes each
    size: int | None


def probe_rank(options: ProbeOptions) -> Probe | None:
    if options.pin_cores:
        pin_to_own_cores()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    rank, world = launch_environment()
    folder = Path(options.deploy)
    manifest = Manifest.load(folder)
    if world != manifest.nodes:
        raise DiscoError(f"the deployment is split across {manifest.nodes} nodes but {world} ranks were started")
    if rank == 0:
        check_out(options.out)  # before anything is measured
    backend, device = choose_backend("gloo")  # the compute probe runs on the CPU
    comm = DistComm.start(timeout=options.timeout, backend=backend, device=device)
    comm.agree_on(sha256_of(folder / MANIFEST_NAME), "manifest")

    barrier(comm, "waiting for every rank to build its model")  # then all compute at once, contending as in a run
    compute = probe_compute(manifest, options.model_code)
    bandwidth, delay = measure_pairs(comm)

    n = comm.world
    row = torch.tensor([compute.macs_per_s, compute.overhead_s, compute.calls_rate, compute.model_s,
                        compute.macs, compute.calls, *bandwidth, *delay], dtype=torch.float64)
    rows = gather(comm, row, "collecting the measurements")
    hosts = gather(comm, _host_bytes(), "collecting the host names")
    flow_rates = together_s = size = None
    if n > 1:  # a single node has no links
        if rank == 0:
            flow_rates = [float(rows[s][6 + d]) for s, d in two_flows(n)]  # each flow alone
            size = torch.tensor([shared_size(min(flow_rates))])
        size = int(broadcast(comm, size, (1,), torch.int64, "agreeing on the two-flows size")[0])
        together_s = measure_both_ways(comm, size)
    comm.close()
    if rank != 0:
        return None

    names = [_host_name(hosts[k]) for k in range(n)]
    unique = len(set(names)) == n
    computes = [Compute(*(float(v) for v in rows[k][:4]), int(rows[k][4]), int(rows[k][5])) for k in range(n)]
    nodes = tuple(NodeSpec(names[k] if unique else f"node{k}", c.macs_per_s, c.overhead_s)
                  for k, c in enumerate(computes))
    shared = _shared_medium(flow_rates, together_s, size) if n > 1 else None
    topology = Topology(nodes, tuple(tuple(float(rows[s][6 + d]) for d in range(n)) for s in range(n)),
                        tuple(tuple(float(rows[s][6 + n + d]) for d in range(n)) for s in range(n)), shared)
    topology.save(options.out)
    return Probe(topology, computes, names, flow_rates, together_s, size)


def print_table(probe: Probe, out: str) -> None:
    topology, n = probe.topology, probe.topology.size
    # GMAC/s is the whole forward's rate (what the topology keeps); calls alone is the fit's, for comparison
    print(f"{'node':<6}{'host':<22}{'GMAC/s':>9}{'calls alone':>13}{'overhead ms':>13}{'forward ms':>12}{'GMAC':>8}"
          f"{'calls':>7}")
    for k, (node, compute) in enumerate(zip(topology.nodes, probe.computes)):
        print(f"{k:<6}{probe.hosts[k][:21]:<22}{node.macs_per_s / 1e9:>9.2f}{compute.calls_rate / 1e9:>13.2f}"
              f"{node.layer_overhead_s * 1e3:>13.3f}{compute.model_s * 1e3:>12.2f}{compute.macs / 1e9:>8.3f}"
              f"{compute.calls:>7}")
    if probe.together_s is None:  # one node: no links
        print(f"wrote {out}")
        return
    print(f"{'link':<8}{'Mbit/s':>10}{'delay ms':>10}")
    for s in range(n):
        for d in range(n):
            if s != d:
                print(f"{f'{s}->{d}':<8}{topology.bandwidth[s][d] / MBIT:>10.1f}{topology.delay[s][d] * 1e3:>10.3f}")
    alone = [probe.size / rate * 1e3 for rate in probe.flow_rates]
    verdict = ("one shared medium" if topology.shared_bandwidth is not None else "no shared medium")
    print(f"two flows at once: {probe.together_s * 1e3:.1f} ms against {max(alone):.1f} ms (the slower alone) and "
          f"{sum(alone):.1f} ms (both in turn): {verdict}")
    print(f"wrote {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m disco.runtime.probe", description=(
        "One rank of `disco probe` (start it with torchrun, or use `disco probe`): measures the nodes and links "
        "of a deployment; rank 0 writes the topology."))
    add_options(parser, ProbeOptions)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = os.environ.get("RANK", "?")
    try:
        options = from_args(ProbeOptions, args)
        probe = probe_rank(options)
    except Exception as error:  # noqa: BLE001 - every failure ends the rank with one line naming it
        report_failure(rank, error, args.verbose, "disco probe")
    if probe is not None:
        print_table(probe, options.out)
    return 0


if __name__ == "__main__":
    import sys

    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # without the interpreter's teardown (a second with torch loaded: disco/runtime/__main__.py)
