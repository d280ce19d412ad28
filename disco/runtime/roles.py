"""What rank 0 and the other ranks do per batch, both through the protocol (protocol.py).

With K batches in flight (`--inflight K`), each rank opens K lanes (comm.lanes) and runs each in a thread of
its own: while one batch waits for a peer's channels, the rank computes another batch's layers. Rank 0 hands
each batch to a free lane; the other ranks serve every lane until rank 0 stops it. Lane k of rank 0 talks only
to lane k of the others, so the batches never mix; K = 1 is the plain sequential run, in the caller's thread.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait

import torch

from disco.errors import DiscoError
from disco.runtime.comm import Comm
from disco.runtime.levels import as_programs
from disco.runtime.protocol import (COUNTERS, KEEPALIVE, REFUSED, RUN, STOP, gather_counters, run_batch,
                                    share_status)


class Coordinator:
    """Rank 0: starts each batch on a free lane, runs its part, assembles the output, times each forward.
    `programs`: the rank's Programs (one per budget the deployment carries; disco/runtime/levels.py), or one
    LocalProgram. A batch runs at the programs' default level unless given one."""

    def __init__(self, programs, comm: Comm, inflight: int = 1):
        self.programs, self.comm = as_programs(programs), comm
        self.lanes = comm.lanes(inflight)
        self.free: queue.Queue = queue.Queue()
        for lane in self.lanes:
            self.free.put(lane)
        self.pool = ThreadPoolExecutor(inflight, thread_name_prefix="disco-lane") if inflight > 1 else None
        self.latencies: list[float] = []
        self.images = 0
        self.first_start, self.last_end = float("inf"), float("-inf")  # of the timed forwards: images per second
        self.timed_images = 0
        self._lock = threading.Lock()

    def forward(self, x: torch.Tensor, timed: bool = True, level: int | None = None):
        """One batch, waited for (the output on rank 0)."""
        return self.submit(x, timed, level).result()

    def submit(self, x: torch.Tensor, timed: bool = True, level: int | None = None) -> Future:
        """One batch, run on the next free lane; the future holds its output. Sequential when inflight is 1."""
        level = self.programs.default if level is None else level
        self.programs.at(level)  # a level the deployment lacks is refused before anything is sent
        if self.pool is not None:
            return self.pool.submit(self._run, x, timed, level)
        future: Future = Future()
        try:
            future.set_result(self._run(x, timed, level))
        except BaseException as error:  # noqa: BLE001 - the caller sees it from future.result(), as with lanes
            future.set_exception(error)
        return future

    def _run(self, x: torch.Tensor, timed: bool, level: int):
        lane = self.free.get()
        try:
            start = time.perf_counter()
            with torch.no_grad():  # grad mode is per thread
                x = x.to(lane.device)
                share_status(lane, RUN, x.shape[0], level)
                output = run_batch(self.programs.at(level), lane, x, x.shape[0])
            if lane.device.type == "cuda":
                torch.cuda.synchronize()
            end = time.perf_counter()
        finally:
            self.free.put(lane)
        with self._lock:
            if timed:
                self.latencies.append(end - start)
                self.first_start, self.last_end = min(self.first_start, start), max(self.last_end, end)
                self.timed_images += x.shape[0]
            self.images += x.shape[0]
        return output

    def gather_counters(self) -> dict[str, list[list[int]]]:
        """Every rank's bytes sent so far, per category as [src][dst], asked for on the next free lane."""
        lane = self.free.get()
        try:
            share_status(lane, COUNTERS, 0)
            return gather_counters(lane)
        finally:
            self.free.put(lane)

    def keep_alive(self) -> None:
        """Tell the other ranks on every idle lane that rank 0 is still there (they wait for work at most
        --timeout before calling it hung)."""
        idle = []
        while True:
            try:
                idle.append(self.free.get_nowait())
            except queue.Empty:
                break
        try:
            for lane in idle:
                share_status(lane, KEEPALIVE, 0)
        finally:
            for lane in idle:
                self.free.put(lane)

    def images_per_s(self) -> float | None:
        span = self.last_end - self.first_start
        return self.timed_images / span if self.timed_images and span > 0 else None

    def stop(self, status: int = STOP) -> None:
        """Every lane told to stop (after the batches in flight: the caller has waited for them)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        for lane in self.lanes:
            share_status(lane, status, 0)


def _serve_lane(programs, lane: Comm) -> None:
    while True:
        status, batch, level = share_status(lane)
        if status == STOP:
            return
        if status == REFUSED:
            raise DiscoError("rank 0 refused the input (see its error); stopping")
        if status == COUNTERS:
            gather_counters(lane)
        if status in (COUNTERS, KEEPALIVE):
            continue
        with torch.no_grad():  # grad mode is per thread
            run_batch(programs.at(level), lane, None, batch)


def serve(programs, comm: Comm, inflight: int = 1) -> None:
    """Ranks other than 0: run every batch rank 0 starts, on every lane, at the level it names, until it says
    stop. `programs`: as the Coordinator's."""
    programs = as_programs(programs)
    lanes = comm.lanes(inflight)
    if len(lanes) == 1:
        _serve_lane(programs, comm)
        return
    pool = ThreadPoolExecutor(len(lanes), thread_name_prefix="disco-lane")
    futures = [pool.submit(_serve_lane, programs, lane) for lane in lanes]
    done, _ = wait(futures, return_when=FIRST_EXCEPTION)
    pool.shutdown(wait=False)  # on a failure, lanes still waiting on a peer end by their own timeout
    for future in done:
        future.result()  # the first failure ends the rank
