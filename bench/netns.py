"""A switched network for benchmarks: every rank in a network namespace of its own, with a link of its own.

bench/latency.py's `shaped_link` puts all ranks on one shaped loopback: one link that every rank shares. Here,
as on a switch, node k has its own namespace whose `eth0` is one end of a veth pair; the other end is a port of
a Linux bridge in a separate bridge namespace. Addresses (10.231.<x>.<k+1>/24, x from the pid) exist only inside
these namespaces, so the host's network never sees them and the ranks can only reach each other through the
shaped links.

Shaping, per node and per direction (full duplex):
  - uplink (what node k sends): `eth0`'s egress inside node k's namespace;
  - downlink (what node k receives): the bridge port's egress inside the bridge namespace.
Each is `tc tbf rate R burst 256kb latency 100ms` (as bench/latency.py does). A one-way delay (NodeLink.delay_ms)
is `netem delay` as the uplink's root qdisc with that tbf as its child: netem holds every packet for the delay,
then tbf paces it, so both take effect (netem's own `rate` is not used). netem is a kernel module
(CONFIG_NET_SCH_NETEM) that some kernels lack: `available(delay=True)` says so before anything is built.
At low rates the 256 kB burst is also a long queue (about 0.2 s at 20 Mbit/s, 0.35 s at 8 Mbit/s): the rate
holds on average, but after a loss TCP delivers in clumps, so measure such links over several seconds.

Usage:
    with switch_network([NodeLink("100mbit"), NodeLink("10mbit")]) as network:   # node 1 ten times slower
        run_ranks(network, [command0, command1], env=dict(os.environ, OMP_NUM_THREADS="1"))

Names carry the pid (namespaces `disco-<pid>-sw`, `disco-<pid>-n<k>`; bridge ports `d<pid>p<k>`), so concurrent
runs do not clash. Everything is removed on exit, also on an exception, SIGINT or SIGTERM; leftovers of an
earlier run with the same pid are removed first.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import ClassVar
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cgroups  # noqa: E402  (bench/cgroups.py)

TBF = ["burst", "256kb", "latency", "100ms"]  # as bench/latency.py shapes its shared link
MTU = "1500"  # Ethernet's, not loopback's 64 KiB: packet counts, and so per-packet costs, as on a real link
DEFAULT_PORT = 29500  # any port will do: node 0's namespace is this run's alone


@dataclass(frozen=True)
class NodeLink:
    """One node's link to the switch. Rates are tc rates ("100mbit", "1gbit", "500kbit"); None: unshaped."""
    rate: str | None = None  # uplink: what the node sends
    down_rate: str | None = ...  # downlink: what it receives; ... (the default): same as rate
    delay_ms: float = 0.0  # one-way delay added to everything the node sends (needs netem)
    burst: str = "256kb"  # tbf's bucket: what passes at full speed after an idle moment. Messages much smaller
    # than it (a 28x28 model's few KB per layer) would cross unshaped: give such links a small burst ("16kb")

    def __post_init__(self):
        if self.down_rate is ...:
            object.__setattr__(self, "down_rate", self.rate)  # full duplex, symmetric
        if self.delay_ms < 0:
            raise ValueError(f"delay_ms must be >= 0, not {self.delay_ms}")

    def slower(self, factor: float) -> NodeLink:
        """This link with both rates divided by `factor` (NodeLink("100mbit").slower(10): 10 Mbit/s each way)."""
        return replace(self, rate=_divide(self.rate, factor), down_rate=_divide(self.down_rate, factor))


def _divide(rate: str | None, factor: float) -> str | None:
    if rate is None:
        return None
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", rate)
    if not match:
        raise ValueError(f"not a tc rate: {rate!r}")
    return f"{float(match[1]) / factor:g}{match[2]}"


@dataclass(frozen=True)
class Network:
    """What the ranks need to know about a switched network built by `switch_network`."""
    tag: str  # "disco-<pid>": every namespace's name starts with it
    subnet: str  # "10.231.<x>": node k is <subnet>.<k+1>
    size: int  # number of nodes
    interface: ClassVar[str] = "eth0"  # each node's one interface: what ranks must give GLOO_SOCKET_IFNAME

    def namespace(self, rank: int) -> str:
        if not 0 <= rank < self.size:
            raise IndexError(f"rank {rank} outside a network of {self.size} nodes")
        return f"{self.tag}-n{rank}"

    def prefix(self, rank: int) -> list[str]:
        """Put this before a command to run it on node `rank`."""
        return ["ip", "netns", "exec", self.namespace(rank)]

    def address(self, rank: int) -> str:
        self.namespace(rank)  # range check
        return f"{self.subnet}.{rank + 1}"

    def rank_environment(self, rank: int, world: int, port: int = DEFAULT_PORT) -> dict[str, str]:
        """torch.distributed's variables for `rank`, as torchrun would set them on a machine of its own."""
        return {"RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": "1",
                "MASTER_ADDR": self.address(0), "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": self.interface}


# --- building and removing -----------------------------------------------------------------------------------
def available(delay: bool = False) -> str | None:
    """None when switch_network works here, else the reason (for a benchmark's 'skipped' line). With delay=True
    it also checks that the kernel has netem, which NodeLink.delay_ms needs."""
    if os.geteuid() != 0:
        return "a network per node needs root (ip netns, tc)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"a network per node needs {' and '.join(missing)} (iproute2)"
    if delay:
        return _netem_missing()
    return None


def _netem_missing() -> str | None:
    """Tries a netem qdisc in a scratch namespace: only the kernel knows whether it has the module."""
    probe = f"disco-{os.getpid()}-probe"
    subprocess.run(["ip", "netns", "add", probe], capture_output=True)
    try:
        result = subprocess.run(["tc", "-n", probe, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
                                capture_output=True, text=True)
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    if result.returncode:
        return f"delays need the kernel's netem qdisc (CONFIG_NET_SCH_NETEM): {result.stderr.strip()}"
    return None


def _run(*command: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"`{' '.join(command)}` failed: {result.stderr.strip()}")


def _remove(tag: str) -> None:
    """Deletes every namespace named `<tag>-...`; their devices (bridge, veths, qdiscs) go with them."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(f"{tag}-"):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _shape(namespace: str, device: str, rate: str | None, delay_ms: float, burst: str) -> None:
    """tbf at `rate` on `device`'s egress; under a netem delay when one is asked (netem root, tbf its child)."""
    tc = ["tc", "-n", namespace, "qdisc", "add", "dev", device]
    tbf = ["tbf", "rate", rate, "burst", burst, *TBF[2:]] if rate is not None else None
    if delay_ms > 0:
        # limit: netem's default (1000 packets) would drop what a fast link keeps in flight during a long delay
        _run(*tc, "root", "handle", "1:", "netem", "delay", f"{delay_ms}ms", "limit", "100000")
        if tbf:
            _run(*tc, "parent", "1:1", "handle", "10:", *tbf)
    elif tbf:
        _run(*tc, "root", *tbf)


def _build(network: Network, links: list[NodeLink], pid: int) -> None:
    switch = f"{network.tag}-sw"
    _run("ip", "netns", "add", switch)
    _run("ip", "-n", switch, "link", "add", "br0", "type", "bridge")
    _run("ip", "-n", switch, "link", "set", "br0", "mtu", MTU, "up")
    for rank, link in enumerate(links):
        node, port = network.namespace(rank), f"d{pid}p{rank}"  # at most 15 characters: d + 7-digit pid + p + k
        _run("ip", "netns", "add", node)
        # created in the bridge namespace with its peer straight in the node's: never a device on the host
        _run("ip", "-n", switch, "link", "add", port, "mtu", MTU, "type", "veth",
             "peer", "name", network.interface, "mtu", MTU, "netns", node)
        _run("ip", "-n", switch, "link", "set", port, "master", "br0", "up")
        _run("ip", "-n", node, "link", "set", "lo", "up")  # a rank reaches its own address through lo
        _run("ip", "-n", node, "addr", "add", f"{network.address(rank)}/24", "dev", network.interface)
        _run("ip", "-n", node, "link", "set", network.interface, "up")
        _shape(node, network.interface, link.rate, link.delay_ms, link.burst)  # uplink
        _shape(switch, port, link.down_rate, 0.0, link.burst)  # downlink: the switch port sends what it receives


def _interrupt(*_) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C, so the `finally` below removes the namespaces


@contextmanager
def switch_network(links: list[NodeLink]):
    """One namespace per node behind one bridge, each node's link shaped as `links[k]` says; yields a Network.
    Everything is removed afterwards, also on an exception, SIGINT or SIGTERM."""
    if not 1 <= len(links) <= 253:
        raise ValueError(f"a /24 holds 1 to 253 nodes, not {len(links)}")
    reason = available(delay=any(link.delay_ms > 0 for link in links))
    if reason:
        raise PermissionError(reason)
    pid = os.getpid()
    network = Network(tag=f"disco-{pid}", subnet=f"10.231.{pid % 254 + 1}", size=len(links))
    in_main = threading.current_thread() is threading.main_thread()  # only there may signal handlers be set
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main else None
    try:
        _remove(network.tag)  # a crashed earlier run whose pid was this one
        _build(network, links, pid)
        yield network
    finally:
        _remove(network.tag)
        if in_main:
            signal.signal(signal.SIGTERM, previous)


# --- running ranks -----------------------------------------------------------------------------------------
def run_ranks(network: Network, commands: list[list[str]], *, env: dict, groups: list[Path | None] | None = None,
              cwd=None, timeout: float = 900, port: int = DEFAULT_PORT) -> list[subprocess.CompletedProcess]:
    """Runs commands[k] on node k (inside CPU-quota cgroup groups[k] when given) with `env` plus the rank's
    torch.distributed variables; waits for all. Returns their CompletedProcess (stdout, stderr as text); raises
    RuntimeError with the failed ranks' stderr tails when any fails or `timeout` (seconds) passes."""
    groups = groups or [None] * len(commands)
    if len(groups) != len(commands) or len(commands) > network.size:
        raise ValueError(f"{len(commands)} commands, {len(groups)} groups, {network.size} nodes")
    # files, not pipes: a rank blocked on a full pipe would stall the collective the others wait in
    outputs = [(tempfile.TemporaryFile(), tempfile.TemporaryFile()) for _ in commands]
    ranks: list[subprocess.Popen] = []
    try:
        for rank, (command, group, (out, err)) in enumerate(zip(commands, groups, outputs)):
            # the cgroup first: `ip netns exec` mounts its own /sys, where the cgroup folders are not to be seen
            full = cgroups.enter_command(group, network.prefix(rank) + list(command))
            ranks.append(subprocess.Popen(full, env={**env, **network.rank_environment(rank, len(commands), port)},
                                          cwd=cwd, stdout=out, stderr=err))
        note = _wait(ranks, timeout)
    finally:
        for process in ranks:  # also on KeyboardInterrupt: no rank outlives the call
            if process.poll() is None:
                process.kill()
                process.wait()
    results = [subprocess.CompletedProcess(p.args, p.returncode, _text(out), _text(err))
               for p, (out, err) in zip(ranks, outputs)]
    failed = [(rank, r) for rank, r in enumerate(results) if r.returncode != 0]
    if failed:
        tails = "\n".join(f"rank {rank} (exit {r.returncode}): {r.stderr[-1500:]}" for rank, r in failed)
        raise RuntimeError(f"{note or 'ranks failed'}\n{tails}")
    return results


def _wait(ranks: list[subprocess.Popen], timeout: float, grace: float = 10.0) -> str | None:
    """Waits for every rank; returns why it stopped waiting early (None when all ended by themselves). Once a
    rank fails the others get `grace` seconds: they are likely blocked in a collective that can never finish."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in ranks):
        failed = [k for k, p in enumerate(ranks) if p.returncode not in (None, 0)]
        if failed:
            deadline = min(deadline, time.monotonic() + grace)
            if time.monotonic() >= deadline:
                return f"rank {failed[0]} failed; the others were stopped {grace:.0f} s later"
        if time.monotonic() >= deadline:
            return f"timed out after {timeout:.0f} s"
        time.sleep(0.05)
    return None


def _text(file) -> str:
    file.seek(0)
    return file.read().decode(errors="replace")
