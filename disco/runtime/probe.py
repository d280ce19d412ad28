"""One rank of `disco probe`: `torchrun --nproc-per-node N -m disco.runtime.probe DEPLOY --out topology.json`.

Measures what disco/topology.py describes, as the deployment will use it, and rank 0 writes it:

1. Compute (probe_compute.py), every rank at once (after a barrier: ranks sharing a host contend as they will in a
   run): the
   deployment's model with random weights, BatchNorms folded into their convs (as disco/runtime/fusion.py folds
   them), batch 1, the rank's threads. Every conv/linear call is timed alone on the input it got in one
   forward, and time_i = o + MACs_i / r is fitted over the calls; o is the node's layer_overhead. Its rate is
   the whole forward's: M / (T - L * o) for a forward of T seconds, M MACs and L calls (at most r), so that
   L * o + M / rate reproduces T (activations, pooling and additions ride on the MACs).
2. Each ordered pair (s, d), one at a time while the others wait at a barrier: the delay and the bandwidth
   (probe_network.py).
3. Two flows at once (0 -> 1 and 2 -> 3, or both ways between 0 and 1): whether the nodes share one medium.

Each rank's measurements travel to rank 0 as one row (probe_measurements.py). All messages go through
disco/runtime/comm.py (category "control"), so a dead or silent peer ends every rank within --timeout with an error
naming it.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from disco.errors import DiscoError
from disco.export.manifest import MANIFEST_NAME, Manifest, sha256_of
from disco.fields import add_options, from_args
from disco.runtime.comm import Comm, DistComm, barrier, broadcast, choose_backend, gather, launch_environment
from disco.runtime.options import ProbeOptions, check_out
from disco.runtime.probe_compute import Compute, probe_compute
from disco.runtime.probe_measurements import RankMeasurements, host_name, host_tensor
from disco.runtime.probe_network import measure_both_ways, measure_pairs, shared_size, two_flows
from disco.runtime.worker import pin_to_own_cores, report_failure
from disco.topology import MBIT, NodeSpec, Topology


# --- the rank ------------------------------------------------------------------------------------------------
@dataclass
class TwoFlows:
    """The two-flows test (probe_network.two_flows) as rank 0 saw it."""

    rates: list[float]  # bytes/s of each flow alone
    together_s: float  # seconds they took together for `size` bytes each
    size: int


@dataclass
class Probe:
    """What rank 0 learnt: the topology it wrote, and the figures behind it that the printed table shows."""

    topology: Topology
    computes: list[Compute]
    hosts: list[str]
    flows: TwoFlows | None  # None: one node, no links


def probe_rank(options: ProbeOptions) -> Probe | None:
    """Measure with every rank; rank 0 writes the topology and returns what it measured (the others: None)."""
    manifest, comm = _start(options)
    barrier(comm, "waiting for every rank to build its model")  # then all compute at once, contending as in a run
    compute = probe_compute(manifest, options.model_code)
    bandwidth, delay = measure_pairs(comm)
    rows = gather(comm, RankMeasurements(compute, bandwidth, delay).to_tensor(), "collecting the measurements")
    hosts = gather(comm, host_tensor(), "collecting the host names")
    measured = None if rows is None else [RankMeasurements.from_tensor(row) for row in rows]
    flows = _two_flows_test(comm, measured) if comm.world > 1 else None  # a single node has no links
    comm.close()
    if measured is None:
        return None
    probe = _assemble(measured, [host_name(host) for host in hosts], flows)
    probe.topology.save(options.out)
    return probe


def _start(options: ProbeOptions) -> tuple[Manifest, Comm]:
    """The deployment's manifest and this rank joined to the others, every rank holding the same manifest."""
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
    return manifest, comm


def _two_flows_test(comm: Comm, measured: list[RankMeasurements] | None) -> TwoFlows | None:
    """Every rank: the two flows sent at once, sized on rank 0 (which passes `measured`) from their rates alone;
    rank 0 gets the test's figures, the others None."""
    rates = size = None
    if comm.rank == 0:
        rates = [measured[src].bandwidth[dst] for src, dst in two_flows(comm.world)]  # each flow alone
        size = torch.tensor([shared_size(min(rates))])
    size = int(broadcast(comm, size, (1,), torch.int64, "agreeing on the two-flows size")[0])
    together_s = measure_both_ways(comm, size)
    return TwoFlows(rates, together_s, size) if comm.rank == 0 else None


def _assemble(measured: list[RankMeasurements], hosts: list[str], flows: TwoFlows | None) -> Probe:
    """Rank 0: the topology of every rank's measurements (nodes named by their hosts when those differ)."""
    unique = len(set(hosts)) == len(hosts)
    nodes = tuple(NodeSpec(hosts[k] if unique else f"node{k}", m.compute.macs_per_s, m.compute.overhead_s)
                  for k, m in enumerate(measured))
    shared = _shared_medium(flows.rates, flows.together_s, flows.size) if flows is not None else None
    topology = Topology(nodes, tuple(tuple(m.bandwidth) for m in measured), tuple(tuple(m.delay) for m in measured),
                        shared)
    return Probe(topology, [m.compute for m in measured], hosts, flows)


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


def print_table(probe: Probe, out: str) -> None:
    topology, n = probe.topology, probe.topology.size
    # GMAC/s is the whole forward's rate (what the topology keeps); calls alone is the fit's, for comparison
    print(f"{'node':<6}{'host':<22}{'GMAC/s':>9}{'calls alone':>13}{'overhead ms':>13}{'forward ms':>12}{'GMAC':>8}"
          f"{'calls':>7}")
    for k, (node, compute) in enumerate(zip(topology.nodes, probe.computes)):
        print(f"{k:<6}{probe.hosts[k][:21]:<22}{node.macs_per_s / 1e9:>9.2f}{compute.calls_rate / 1e9:>13.2f}"
              f"{node.layer_overhead_s * 1e3:>13.3f}{compute.model_s * 1e3:>12.2f}{compute.macs / 1e9:>8.3f}"
              f"{compute.calls:>7}")
    flows = probe.flows
    if flows is None:  # one node: no links
        print(f"wrote {out}")
        return
    print(f"{'link':<8}{'Mbit/s':>10}{'delay ms':>10}")
    for s in range(n):
        for d in range(n):
            if s != d:
                print(f"{f'{s}->{d}':<8}{topology.bandwidth[s][d] / MBIT:>10.1f}{topology.delay[s][d] * 1e3:>10.3f}")
    alone = [flows.size / rate * 1e3 for rate in flows.rates]
    verdict = ("one shared medium" if topology.shared_bandwidth is not None else "no shared medium")
    print(f"two flows at once: {flows.together_s * 1e3:.1f} ms against {max(alone):.1f} ms (the slower alone) and "
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
