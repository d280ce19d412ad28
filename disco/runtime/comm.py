"""All communication of the runtime, in one place: point-to-point transfers counted at the send call, over
torch.distributed (DistComm) or between threads of one process (MemoryComm, same semantics).

Every transfer is a batch of isend/irecv posted together (`exchange`), so a rank can compute while its
channels are in flight and NCCL never deadlocks on send ordering. Bytes are counted per destination and
category when a send is posted. A failed or timed-out transfer raises PeerFailure naming the peer, so a
dead or hung rank ends the run with an error instead of a hang.

`lanes(K)` gives K independent channels over the same ranks (one process group each over torch.distributed),
so K batches can be in flight at once (`disco run --inflight K`), each in its own thread; messages of one lane
never match another lane's, and all lanes count into the same byte counters.
"""
from __future__ import annotations

import datetime
import os
import queue
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from disco.errors import DiscoError

CATEGORIES = ("activations", "norm", "fallback", "input", "output", "control")
JOIN_TIMEOUT_S = 60.0  # joining the group: at least this long, whatever --timeout says


class PeerFailure(DiscoError):
    """A transfer with another rank failed or timed out."""


@dataclass
class Exchange:
    """Transfers in flight; `wait()` returns the received tensors by source rank."""

    comm: "Comm"
    what: str
    pending: list[tuple[object, list[int]]]
    received: dict[int, torch.Tensor] = field(default_factory=dict)
    in_flight: list[torch.Tensor] = field(default_factory=list)  # send buffers must live until waited

    arrivals: dict = field(default_factory=dict)  # MemoryComm: receives by source

    def wait(self) -> dict[int, torch.Tensor]:
        began = time.perf_counter()
        with torch.profiler.record_function(f"wait: {self.what}"):  # a named span in --profile traces
            for work, peers in self.pending:
                try:
                    work.wait()
                except RuntimeError as error:  # gloo/NCCL report both dead peers and timeouts this way
                    raise self.comm.failure(peers, self.what, error) from None
        self.comm.counters.add_wait(time.perf_counter() - began)
        self.received.update({src: arrival.value for src, arrival in self.arrivals.items()})
        self.pending, self.in_flight, self.arrivals = [], [], {}
        return self.received


def launch_environment() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment, with a clear error when it is missing."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DiscoError(f"not started by torchrun ({', '.join(missing)} unset): use `disco run` or "
                         "`torchrun ... -m disco.runtime`")
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def choose_backend(backend: str) -> tuple[str, torch.device]:
    """gloo on CPU; NCCL when this rank has a GPU (backend "auto")."""
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise DiscoError("--backend nccl needs a GPU on every rank")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return backend, device
    if backend != "gloo":
        raise DiscoError(f"unknown backend {backend!r}; known: auto, gloo, nccl")
    return backend, torch.device("cpu")


class Counters:
    """A rank's bytes sent per category and destination, and seconds spent waiting for transfers (--profile
    tells compute from waiting): one object shared by all the rank's lanes, which add to it from their threads."""

    def __init__(self, world: int):
        self.sent = {category: [0] * world for category in CATEGORIES}
        self.waited_s = 0.0
        self.lock = threading.Lock()

    def add_sent(self, category: str, sizes: dict[int, int]) -> None:
        with self.lock:
            for dst, size in sizes.items():
                self.sent[category][dst] += size

    def add_wait(self, seconds: float) -> None:
        with self.lock:
            self.waited_s += seconds


class Comm:
    """One rank's view of the group (rank, world size, device) plus byte counters. Subclasses move the bytes:
    DistComm over torch.distributed (real processes or hosts), MemoryComm between threads of one process."""

    def __init__(self, rank: int, world: int, device: torch.device, timeout: float,
                 counters: Counters | None = None):
        self.rank, self.world, self.device, self.timeout = rank, world, device, timeout
        self.counters = counters or Counters(world)

    @property
    def sent(self) -> dict[str, list[int]]:
        return self.counters.sent

    @property
    def waited_s(self) -> float:
        return self.counters.waited_s

    def lanes(self, count: int) -> list["Comm"]:
        """`count` independent channels between the same ranks, counting into this one's counters ([self] for
        one). Every rank must ask for the same count (over torch.distributed it is a collective call)."""
        return [self] if count == 1 else [self._lane(k) for k in range(count)]

    def _lane(self, index: int) -> "Comm":
        raise NotImplementedError

    def sent_total(self) -> int:
        return sum(map(sum, self.sent.values()))

    def exchange(self, sends: dict[int, torch.Tensor], receives: dict[int, tuple[tuple[int, ...], torch.dtype]],
                 *, category: str, what: str) -> Exchange:
        """Post sends {dst: tensor} and receives {src: (shape, dtype)} at once; returns before they finish.
        Bytes are counted here, when a send is posted, whatever moves them."""
        sends = {dst: tensor.to(self.device).contiguous() for dst, tensor in sends.items()}
        self.counters.add_sent(category, {dst: t.numel() * t.element_size() for dst, t in sends.items()})
        return self._post(sends, receives, what)

    def _post(self, sends: dict[int, torch.Tensor], receives: dict, what: str) -> Exchange:
        raise NotImplementedError

    def send(self, tensor: torch.Tensor, dst: int, *, category: str, what: str) -> None:
        self.exchange({dst: tensor}, {}, category=category, what=what).wait()

    def receive(self, shape, dtype: torch.dtype, src: int, *, what: str) -> torch.Tensor:
        return self.exchange({}, {src: (tuple(shape), dtype)}, category="control", what=what).wait()[src]

    def agree_on(self, digest: str, what: str) -> None:
        """Every rank must hold the same `what` (compared by sha256 hex digest)."""
        mine = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8)
        others = [k for k in range(self.world) if k != self.rank]
        received = self.exchange({k: mine for k in others}, {k: (tuple(mine.shape), mine.dtype) for k in others},
                                 category="control", what=f"checking the {what}").wait()
        differing = sorted(k for k, other in received.items() if not torch.equal(other.cpu(), mine))
        if differing:
            raise DiscoError(f"rank {self.rank}: ranks {differing} hold a different {what}; copy the same "
                             "deployment to every host")

    def failure(self, peers: list[int], what: str, error: Exception) -> PeerFailure:
        text = str(error)
        names = " or ".join(f"rank {p}" for p in peers)
        if "imed out" in text or "timeout" in text.lower():
            reason = f"no answer from {names} within {self.timeout:g} s (--timeout); it is hung or too slow"
        else:
            reason = f"lost the connection to {names}; that process probably died (see its own error)"
        return PeerFailure(f"rank {self.rank}: {what}: {reason}. [{text.splitlines()[0][:200]}]")

    def close(self) -> None:
        pass


class DistComm(Comm):
    """torch.distributed point-to-point (gloo, NCCL): one batch of isend/irecv per exchange, in `group`: a process
    group over every rank with the peer timeout (lanes have one each)."""

    group = None

    @classmethod
    def start(cls, *, timeout: float, backend: str, device: torch.device) -> "DistComm":
        """Join the group described by torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT). Joining may
        take up to JOIN_TIMEOUT_S (ranks load their shards at their own pace, more so when torchrun restarts them);
        the traffic has a group of its own that waits at most `timeout` for a peer."""
        join_timeout = max(timeout, JOIN_TIMEOUT_S)
        try:
            store, rank, world = next(dist.rendezvous("env://", timeout=datetime.timedelta(seconds=join_timeout)))
            # torchrun keeps its store across restarts: without a prefix of their own, restarted ranks read the
            # addresses the previous ranks published and wait for dead peers (measured: the group never forms)
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            dist.init_process_group(backend, store=dist.PrefixStore(f"disco/attempt-{attempt}/", store), rank=rank,
                                    world_size=world, timeout=datetime.timedelta(seconds=join_timeout))
            comm = cls(dist.get_rank(), dist.get_world_size(), device, timeout)
            # the traffic's own group: gloo keeps a group's creation timeout for point-to-point waits (measured:
            # dist.set_timeout on the joined group leaves a frozen peer undetected for the join timeout)
            comm.group = dist.new_group(timeout=datetime.timedelta(seconds=timeout))
        except (RuntimeError, ValueError) as error:
            raise PeerFailure(f"could not join the process group within {join_timeout:g} s ({backend}): "
                              f"{str(error).splitlines()[0]}") from None
        return comm

    def _lane(self, index: int) -> "DistComm":
        lane = DistComm(self.rank, self.world, self.device, self.timeout, self.counters)
        try:
            lane.group = dist.new_group(timeout=datetime.timedelta(seconds=self.timeout))
        except RuntimeError as error:
            raise PeerFailure(f"rank {self.rank}: could not open lane {index} of the batches in flight: "
                              f"{str(error).splitlines()[0]}") from None
        return lane

    def _post(self, sends: dict[int, torch.Tensor], receives: dict, what: str) -> Exchange:
        ops, peers, exchange = [], [], Exchange(self, what, [])
        for dst, tensor in sends.items():
            ops.append(dist.P2POp(dist.isend, tensor, dst, group=self.group))
            peers.append(dst)
        for src, (shape, dtype) in receives.items():
            buffer = torch.empty(shape, dtype=dtype, device=self.device)
            exchange.received[src] = buffer
            ops.append(dist.P2POp(dist.irecv, buffer, src, group=self.group))
            peers.append(src)
        if not ops:
            return exchange
        try:
            works = dist.batch_isend_irecv(ops)
        except RuntimeError as error:
            raise self.failure(peers, what, error) from None
        if len(works) == len(ops):
            exchange.pending = [(work, [peer]) for work, peer in zip(works, peers)]
        else:  # one work for the whole batch (NCCL)
            exchange.pending = [(work, sorted(set(peers))) for work in works]
        exchange.in_flight = [op.tensor for op in ops]
        return exchange

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class _Arrival:
    """A receive from a MemoryComm peer: waiting takes the next tensor that peer sent this rank."""

    def __init__(self, queue: "queue.Queue", shape: tuple[int, ...], dtype: torch.dtype, timeout: float):
        self.queue, self.shape, self.dtype, self.timeout, self.value = queue, shape, dtype, timeout, None

    def wait(self) -> None:
        try:
            self.value = self.queue.get(timeout=self.timeout)
        except queue.Empty:
            raise RuntimeError(f"timed out after {self.timeout:g} s") from None
        if tuple(self.value.shape) != tuple(self.shape) or self.value.dtype != self.dtype:
            raise DiscoError(f"protocol error: expected {tuple(self.shape)} {self.dtype}, received "
                             f"{tuple(self.value.shape)} {self.value.dtype}")


class MemoryComm(Comm):
    """A rank of an in-process group (`memory_group`): messages are tensors in per-(lane, src, dst) FIFO queues,
    in the order they were posted, as over torch.distributed; sends never block. Used to run every rank's
    program in threads of one process (tests, debugging: disco.runtime.inprocess)."""

    def __init__(self, rank: int, queues: dict[tuple, "queue.Queue"], world: int, timeout: float, lane=(),
                 counters: Counters | None = None):
        super().__init__(rank, world, torch.device("cpu"), timeout, counters)
        self.queues, self.lane = queues, lane

    def _queue(self, src: int, dst: int) -> "queue.Queue":
        # setdefault is one atomic step: two ranks' threads asking for a new lane's queue get the same one;
        # a new Queue (three Conditions) is made only the first time, not on every message
        key = (self.lane, src, dst)
        return self.queues.get(key) or self.queues.setdefault(key, queue.Queue())

    def _lane(self, index: int) -> "MemoryComm":
        return MemoryComm(self.rank, self.queues, self.world, self.timeout, (*self.lane, index), self.counters)

    def _post(self, sends: dict[int, torch.Tensor], receives: dict, what: str) -> Exchange:
        for dst, tensor in sends.items():
            self._queue(self.rank, dst).put(tensor.clone())
        arrivals = {src: _Arrival(self._queue(src, self.rank), tuple(shape), dtype, self.timeout)
                    for src, (shape, dtype) in receives.items()}
        return Exchange(self, what, [(arrival, [src]) for src, arrival in arrivals.items()], arrivals=arrivals)


def memory_group(world: int, timeout: float = 60.0) -> list[MemoryComm]:
    """`world` connected in-process ranks."""
    queues: dict = {}
    return [MemoryComm(rank, queues, world, timeout) for rank in range(world)]


# --- small collectives over point-to-point messages (category "control") -------------------------------------
def tiny_message() -> torch.Tensor:
    """One float: a signal whose content does not matter (arrived, go, acknowledged)."""
    return torch.zeros(1)


def barrier(comm: Comm, what: str) -> None:
    """Every rank tells rank 0 it arrived; rank 0 then lets them all go."""
    others = [k for k in range(comm.world) if k != comm.rank]
    if comm.rank == 0:
        comm.exchange({}, {k: ((1,), torch.float32) for k in others}, category="control", what=what).wait()
        comm.exchange({k: tiny_message() for k in others}, {}, category="control", what=what).wait()
    else:
        comm.send(tiny_message(), 0, category="control", what=what)
        comm.receive((1,), torch.float32, 0, what=what)


def gather(comm: Comm, tensor: torch.Tensor, what: str) -> list[torch.Tensor] | None:
    """Rank 0: every rank's `tensor` (same shape and dtype on all) in rank order, its own as it is and the others'
    on the CPU; the others: None."""
    if comm.rank != 0:
        comm.send(tensor, 0, category="control", what=what)
        return None
    others = {k: (tuple(tensor.shape), tensor.dtype) for k in range(1, comm.world)}
    received = comm.exchange({}, others, category="control", what=what).wait()
    return [tensor] + [received[k].cpu() for k in range(1, comm.world)]


def broadcast(comm: Comm, tensor: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype,
              what: str) -> torch.Tensor:
    """Rank 0's `tensor` on every rank."""
    if comm.rank == 0:
        comm.exchange({k: tensor for k in range(1, comm.world)}, {}, category="control", what=what).wait()
        return tensor
    return comm.receive(shape, dtype, 0, what=what)
