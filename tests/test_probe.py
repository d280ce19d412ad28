"""`disco probe` end to end: 2 ranks started through the CLI measure a small deployment and write a topology whose
numbers hold up against independent measurements (a model timed here; a loopback shaped to 40 Mbit/s, as root)."""
from __future__ import annotations

import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext

import pytest
import torch

from disco.export.manifest import Manifest
from disco.topology import MBIT, Topology
from runtime_helpers import make_deployment


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    return make_deployment(tmp_path_factory.mktemp("probe") / "deploy", "resnet18", 2, size=64, images=1)


def _netns_missing() -> str | None:
    if os.geteuid() != 0:
        return "shaping a loopback needs root (ip netns, tc)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    return f"shaping a loopback needs {' and '.join(missing)} (iproute2)" if missing else None


SHAPED = _netns_missing() is None


@contextmanager
def shaped_loopback(rate: str):
    """A fresh network namespace whose loopback is limited by tc as bench/latency.py's shaped_link does it
    (Ethernet's MTU, tbf at `rate`); yields the prefix that runs a command in it; removed afterwards."""
    namespace = f"disco-probe-test-{os.getpid()}"
    subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
    try:
        for command in (["ip", "netns", "add", namespace],
                        ["ip", "-n", namespace, "link", "set", "lo", "up", "mtu", "1500"],
                        ["tc", "-n", namespace, "qdisc", "add", "dev", "lo", "root", "tbf", "rate", rate, "burst",
                         "256kb", "latency", "100ms"]):
            subprocess.run(command, check=True, capture_output=True)
        yield ["ip", "netns", "exec", namespace]
    finally:
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


@pytest.fixture(scope="module")
def probed(deployment):
    """One real `disco probe` of 2 ranks (about 20 s, most of it starting torchrun and the ranks): as root inside a
    loopback shaped to 40 Mbit/s (the compute probe and the file do not depend on the link: one run serves every
    test), else on the host's own loopback."""
    out = deployment.folder.parent / "topology.json"
    command = [sys.executable, "-m", "disco", "probe", str(deployment.folder), "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    with (shaped_loopback("40mbit") if SHAPED else nullcontext([])) as prefix:
        result = subprocess.run(prefix + command, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr
    return Topology.load(out), result.stdout


def test_probe_writes_a_topology_of_every_node(probed):
    topology, stdout = probed
    assert topology.size == 2
    assert all(node.macs_per_s > 0 and node.layer_overhead_s >= 0 for node in topology.nodes)
    for s, d in ((0, 1), (1, 0)):
        assert 0 < topology.bandwidth[s][d] < math.inf
        assert 0 <= topology.delay[s][d] < 1.0  # seconds: finite, and far below a second on one host
    assert "GMAC/s" in stdout and "0->1" in stdout and "wrote " in stdout


def test_the_fitted_rate_predicts_the_whole_model_time(probed, deployment):
    """An independent reference: the deployment's model timed in this process (one thread, as each rank has),
    its MACs counted by torch's own FLOP counter and its layer calls by the manifest's plans, against
    L * overhead + M / rate of each node."""
    from torch.fx.experimental.optimization import fuse
    from torch.utils.flop_counter import FlopCounterMode

    from disco.export.trust import build_deployed_model

    topology, _ = probed
    manifest = Manifest.load(deployment.folder)
    model = fuse(build_deployed_model(manifest.model, None).eval())
    x = torch.randn(1, *manifest.input_shape)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            with FlopCounterMode(display=False) as counter:
                model(x)
            times = []
            for _ in range(8):
                began = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - began)
    finally:
        torch.set_num_threads(threads)
    measured = statistics.median(times[1:])
    macs, calls = counter.get_total_flops() / 2, len(manifest.plans)
    for node in topology.nodes:
        predicted = calls * node.layer_overhead_s + macs / node.macs_per_s
        assert measured / 2 < predicted < measured * 2, (node, predicted, measured)


def test_a_missing_deployment_or_out_folder_is_one_clear_line(deployment, tmp_path):
    """Both refused by `disco probe` itself, before any rank starts (the two run at once: each is mostly
    importing torch)."""
    nowhere, missing = tmp_path / "nowhere", tmp_path / "missing" / "topology.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = [subprocess.Popen([sys.executable, "-m", "disco", "probe", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
            for args in ([str(nowhere), "--out", str(tmp_path / "topology.json")],
                         [str(deployment.folder), "--out", str(missing)])]
    expected = [f"disco probe: error: no manifest.json in {nowhere}: export a deployment with `disco export` first",
                f"disco probe: error: --out {missing}: folder {missing.parent} does not exist"]
    for run, line in zip(runs, expected):
        _, stderr = run.communicate(timeout=120)
        assert run.returncode == 2 and stderr.strip().splitlines() == [line], stderr


@pytest.mark.skipif(not SHAPED, reason=str(_netns_missing()))
def test_a_loopback_shaped_to_40_mbit_is_measured_as_one_shared_40_mbit_medium(probed):
    """Both ranks on one loopback limited to 40 Mbit/s: each pair gets 40 Mbit/s, and all pairs at once share
    those 40 (a loopback is one medium)."""
    topology, stdout = probed
    for s, d in ((0, 1), (1, 0)):
        assert topology.bandwidth[s][d] / MBIT == pytest.approx(40, rel=0.3), stdout
    assert topology.shared_bandwidth is not None, stdout
    assert topology.shared_bandwidth / MBIT == pytest.approx(40, rel=0.3), stdout


def test_two_flows_tell_a_switch_from_one_shared_medium():
    from disco.runtime.probe import _shared_medium

    size = 1_000_000
    # equal flows of 1 MB/s: on a switch together they take 1 s (each on its wire), on one medium 2 s
    assert _shared_medium([1e6, 1e6], 1.05, size) is None
    assert _shared_medium([1e6, 1e6], 2.0, size) == pytest.approx(1e6)
    # a fast and a ten times slower flow (one node on a slow link): on a switch together as long as the slow one
    # alone (1 s), on one medium as both in turn (1.1 s)
    assert _shared_medium([10e6, 1e6], 1.0, size) is None
    assert _shared_medium([10e6, 1e6], 1.1, size) == pytest.approx(2 * size / 1.1)
