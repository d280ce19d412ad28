"""bench/netns.py: a switched network with one shaped link per node, measured with real TCP traffic.

Needs root and iproute2 (skipped otherwise); the delay test also needs the kernel's netem. About 15 s.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import netns  # noqa: E402  (bench/netns.py)
from netns import NodeLink, switch_network  # noqa: E402

pytestmark = pytest.mark.skipif(netns.available() is not None, reason=str(netns.available()))

# Receives one connection; after `skip` s (tbf's 256 kB burst and TCP's slow start) measures `window` s of it.
RECEIVE = """
import socket, sys, time
port, skip, window = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
server = socket.create_server(("", port))
connection, _ = server.accept()
total, start, began = 0, None, None
while True:
    data = connection.recv(1 << 16)
    if not data:
        sys.exit("sender stopped early")
    now = time.perf_counter()
    began = began or now
    total += len(data)
    if start is None and now - began >= skip:
        start = (now, total)
    elif start is not None and now - start[0] >= window:
        print((total - start[1]) * 8 / (now - start[0]) / 1e6)  # Mbit/s
        break
"""

# Sends as fast as it can until the receiver hangs up (or `seconds` pass).
SEND = """
import socket, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
for _ in range(200):  # the receiver may not be listening yet
    try:
        connection = socket.create_connection((host, port))
        break
    except ConnectionRefusedError:
        time.sleep(0.02)
chunk, end = bytes(1 << 16), time.monotonic() + seconds
try:
    while time.monotonic() < end:
        connection.sendall(chunk)
except (BrokenPipeError, ConnectionResetError):
    pass
"""

# Median time of TCP connects (one round trip: SYN out, SYN-ACK back), in ms, to a server that accepts them.
CONNECT = """
import socket, statistics, sys, time
host, port = sys.argv[1], int(sys.argv[2])
times = []
for attempt in range(300):
    began = time.perf_counter()
    try:
        socket.create_connection((host, port)).close()
    except ConnectionRefusedError:
        time.sleep(0.02)
        continue
    times.append((time.perf_counter() - began) * 1000)
    if len(times) == 7:
        break
print(statistics.median(times))
"""
ACCEPT = """
import socket, sys
server = socket.create_server(("", int(sys.argv[1])))
while True:
    server.accept()[0].close()
"""


def _python(network, rank: int, code: str, *args) -> subprocess.Popen:
    return subprocess.Popen(network.prefix(rank) + [sys.executable, "-c", code, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def throughput(network, pairs: list[tuple[int, int]], skip: float = 0.4, window: float = 1.0) -> list[float]:
    """Mbit/s of each (sender, receiver) pair's TCP stream, all streams at the same time."""
    receivers = [_python(network, dst, RECEIVE, 5000 + k, skip, window) for k, (_, dst) in enumerate(pairs)]
    senders = [_python(network, src, SEND, network.address(dst), 5000 + k, 10)
               for k, (src, dst) in enumerate(pairs)]
    rates = []
    for process in receivers + senders:
        out, err = process.communicate(timeout=30)
        assert process.returncode == 0, err
        if process in receivers:
            rates.append(float(out))
    return rates


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


def _host_state() -> str:
    """The host's devices and IPv4 addresses, where none of the network's may ever appear."""
    return (subprocess.run(["ip", "link"], capture_output=True, text=True, check=True).stdout
            + subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True, check=True).stdout)


def _assert_gone(tag: str) -> None:
    assert tag + "-" not in _namespaces()
    assert f"d{tag.split('-')[1]}p" not in _host_state()


def test_addresses_live_only_inside_the_namespaces_and_everything_is_removed():
    with switch_network([NodeLink(), NodeLink("10mbit")]) as network:
        assert network.subnet.startswith("10.231.") and network.interface == "eth0"
        assert network.subnet + "." not in _host_state()
        inside = subprocess.run(network.prefix(1) + ["ip", "-4", "addr"], capture_output=True, text=True).stdout
        assert f"{network.address(1)}/24" in inside and "eth0" in inside
        assert f"{network.tag}-n0" in _namespaces() and f"{network.tag}-sw" in _namespaces()
        assert network.rank_environment(1, 2, 29511) == {
            "RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": network.address(0), "MASTER_PORT": "29511", "GLOO_SOCKET_IFNAME": "eth0"}
    _assert_gone(network.tag)
    assert network.subnet + "." not in _host_state()


# 20 and 200 Mbit/s: below about 20 Mbit/s tbf's 256 kB burst is a queue of a quarter second or more, and a lost
# packet then holds back what arrives for that long, too long for one-second measurements.
def test_each_node_has_its_own_rate_in_each_direction():
    with switch_network([NodeLink("200mbit"), NodeLink("20mbit"), NodeLink("200mbit")]) as network:
        to_slow, = throughput(network, [(0, 1)])
        to_fast, = throughput(network, [(0, 2)])
        forth, back = throughput(network, [(0, 2), (2, 0)])  # full duplex: neither direction takes from the other
    assert 20 * 0.7 < to_slow < 20 * 1.3, to_slow
    assert 200 * 0.7 < to_fast < 200 * 1.3, to_fast
    assert 200 * 0.7 < forth < 200 * 1.3 and 200 * 0.7 < back < 200 * 1.3, (forth, back)


def test_a_slower_link_is_the_bottleneck_only_for_its_own_node():
    fast = NodeLink("200mbit")
    with switch_network([fast, fast.slower(10), fast]) as network:
        from_slow, between_fast = throughput(network, [(1, 0), (0, 2)])  # at the same time, on disjoint links
    assert 20 * 0.7 < from_slow < 20 * 1.3 and 200 * 0.7 < between_fast < 200 * 1.3, (from_slow, between_fast)


@pytest.mark.skipif(netns.available(delay=True) is not None, reason=str(netns.available(delay=True)))
def test_a_delay_applies_to_its_node_only_and_the_rate_still_holds():
    with switch_network([NodeLink("20mbit", delay_ms=20), NodeLink("200mbit"), NodeLink("200mbit")]) as network:
        servers = [_python(network, rank, ACCEPT, 6000) for rank in (1, 2)]
        try:
            delayed = _python(network, 0, CONNECT, network.address(1), 6000).communicate(timeout=30)[0]
            direct = _python(network, 2, CONNECT, network.address(1), 6000).communicate(timeout=30)[0]
        finally:
            for server in servers:
                server.kill()
                server.wait()
        rate, = throughput(network, [(0, 1)])
    assert float(delayed) >= 20 * 0.98, delayed  # node 0's SYN waits 20 ms on its way out
    assert float(direct) < 10, direct
    assert 20 * 0.7 < rate < 20 * 1.3, rate


def test_removed_when_the_body_raises():
    with pytest.raises(RuntimeError, match="body failed"):
        with switch_network([NodeLink("10mbit"), NodeLink()]) as network:
            raise RuntimeError("body failed")
    _assert_gone(network.tag)


def test_removed_on_sigterm_and_stale_ones_first():
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); import netns\n"
            "with netns.switch_network([netns.NodeLink('10mbit')] * 2) as network:\n"
            "    print(network.tag, flush=True); time.sleep(60)\n")
    process = subprocess.Popen([sys.executable, "-c", code, str(Path(netns.__file__).parent)],
                               stdout=subprocess.PIPE, text=True)
    tag = process.stdout.readline().strip()
    assert f"{tag}-n1" in _namespaces()
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=10)
    _assert_gone(tag)
    # a leftover of a crashed run with this pid is removed before the new network is built
    stale = f"disco-{os.getpid()}-n7"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    with switch_network([NodeLink()]):
        assert stale not in _namespaces()


def test_gloo_ranks_bind_eth0_and_reach_master_addr():
    code = ("import os, torch, torch.distributed as dist\n"
            "dist.init_process_group('gloo')\n"
            "tensor = torch.tensor([float(dist.get_rank() + 1)])\n"
            "dist.all_reduce(tensor)\n"
            "print(tensor.item(), os.environ['GLOO_SOCKET_IFNAME'], os.environ['MASTER_ADDR'])\n"
            "dist.destroy_process_group()\n")
    with switch_network([NodeLink("100mbit"), NodeLink("100mbit")]) as network:
        results = netns.run_ranks(network, [[sys.executable, "-c", code]] * 2,
                                  env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=60)
    assert [r.stdout.split() for r in results] == [["3.0", "eth0", network.address(0)]] * 2


def test_run_ranks_reports_the_failing_rank():
    with switch_network([NodeLink(), NodeLink()]) as network:
        with pytest.raises(RuntimeError, match=r"rank 1 \(exit 3\): boom"):
            failing = [sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"]
            netns.run_ranks(network, [["true"], failing], env=dict(os.environ), timeout=30)
