"""`disco probe`'s link measurements (probe.py says how they fit in): each ordered pair's delay and bandwidth, one
pair at a time while the other ranks wait at a barrier, and two flows at once (0 -> 1 and 2 -> 3, or both ways
between 0 and 1), timed for probe.py to tell whether the nodes share one medium.

All messages go through disco/runtime/comm.py (category "control").
"""
from __future__ import annotations

import math
import statistics
import time

import torch

from disco.runtime.comm import Comm, barrier, gather, tiny_message

PINGS = 20  # round trips of a tiny message per pair (after 2 untimed)
FIRST_BYTES, LARGEST_BYTES = 256 << 10, 64 << 20  # bandwidth messages: doubling from 256 KiB, at most 64 MiB
LONG_ENOUGH_S = 0.1  # ... until one transfer takes this long
TIMINGS = 3  # transfers per size for the sizes the bandwidth is computed from (median)


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
                timed[each].append(max(float(t) for t in times))
    if comm.rank != 0:
        return None
    t_small, t_large = statistics.median(timed[size]), statistics.median(timed[2 * size])
    return t_large - t_small if t_large > t_small else t_large / 2  # seconds for `size` more bytes per flow
