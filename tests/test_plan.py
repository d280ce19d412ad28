"""Topologies and `disco plan`: the file format's checks, the latency prediction against a hand-worked timeline,
and the command on a real deployment."""
from __future__ import annotations

import json

import pytest
import torch

import disco
from disco.accounting.costs import ExpectedCosts
from disco.errors import DiscoError
from disco.export import ModelSpec, export
from disco.planning.latency import predict
from disco.split.masks import keep_random_groups
from disco.topology import MBIT, Topology
from tests_helpers import tiny_model_spec
from disco.models import build_for_data


def _two_nodes(shared: float | None = None) -> Topology:
    """Node 0 at 1 GMAC/s, node 1 at 0.5; 1 MB/s each way, 1 ms one way; no per-layer overhead."""
    data = {"nodes": [{"gmac_per_s": 1.0}, {"gmac_per_s": 0.5}], "mbit_per_s": [[None, 8], [8, None]],
            "delay_ms": [[None, 1], [1, None]], "shared_mbit_per_s": shared}
    return Topology.from_dict(data)


# a deployment's costs as its manifest keeps them (ExpectedCosts' JSON form); what predict() does not read is 0
REPORT = {"nodes": 2, "bytes": 1500, "bytes_matrix": [[0, 1000], [500, 0]], "io_bytes": {"input": 1000, "output": 800},
          "attention_macs_per_node": [0, 0],
          "layers": [{"name": "conv", "type": "conv2d", "in_channels": 0, "out_channels": 0, "elements_per_channel": 0,
                      "groups_total": 0, "groups_kept": 0, "dense_bytes": 1500, "bytes": 1500,
                      "bytes_matrix": [[0, 1000], [500, 0]], "macs_per_node": [2_000_000, 1_000_000],
                      "dense_macs_per_node": [2_000_000, 1_000_000], "received_macs_per_node": [1_000_000, 0],
                      "conv_groups": 1}]}


def _predict(report: dict, topology: Topology):
    return predict(ExpectedCosts.from_json(report), topology)


def test_prediction_follows_the_runtime_timeline_worked_by_hand():
    # input 0 -> 1: 1000 B on a 1 MB/s link, 1 ms delay: node 1 starts at 2 ms.
    # conv: 0 -> 1 (1000 B) waits for 0's uplink (busy with the input until 1 ms): arrives 1 + 1 + 1 = 3 ms;
    #   1 -> 0 (500 B) posted at 2 ms: arrives 2 + 0.5 + 1 = 3.5 ms.
    #   node 0: local 1 MMAC (1 ms), waits until 3.5 ms, received part 1 MMAC: done at 4.5 ms;
    #   node 1: local 1 MMAC at 0.5 GMAC/s (2 ms): done at 4 ms (its message arrived at 3 ms).
    # output 1 -> 0 (800 B) posted at 4 ms: arrives 4 + 0.8 + 1 = 5.8 ms, after node 0's 4.5 ms.
    prediction = _predict(REPORT, _two_nodes())
    assert prediction.latency_s == pytest.approx(5.8e-3)
    assert [(s.kind, s.where) for s in prediction.critical_path] == [
        ("transfer", "link 0->1"), ("compute", "node 1"), ("transfer", "link 1->0")]
    assert sum(s.seconds for s in prediction.critical_path) == pytest.approx(prediction.latency_s)
    assert prediction.compute_s_per_node == pytest.approx([2e-3, 2e-3])
    # streaming: node 1's uplink carries 500 + 800 B per image (1.3 ms), more than any node computes
    assert prediction.images_per_s == pytest.approx(1 / 2e-3)


def test_a_shared_medium_makes_concurrent_messages_take_turns():
    report = {**REPORT, "layers": [{**REPORT["layers"][0], "bytes_matrix": [[0, 4000], [4000, 0]]}]}
    switch, shared = _predict(report, _two_nodes()), _predict(report, _two_nodes(shared=8))
    # switch: 0 -> 1 on the wire 1-5 ms (after the input), 1 -> 0 posted at 2 ms on its own wire 2-6 ms: node 0
    # waits until 7 ms, computes 1 ms more: 8 ms; node 1's output (800 B) 6-6.8 ms arrives at 7.8 ms.
    # one medium: 1 -> 0 waits for it until 5 ms, arrives at 10 ms: node 0 done at 11 ms; node 1's output waits
    # for the medium until 9 ms and arrives at 10.8 ms.
    assert switch.latency_s == pytest.approx(8e-3) and shared.latency_s == pytest.approx(11e-3)


def test_a_grouped_conv_that_receives_waits_before_computing():
    layer = {**REPORT["layers"][0], "conv_groups": 4}
    grouped = _predict({**REPORT, "layers": [layer]}, _two_nodes())
    # node 0 now computes all 2 MMAC after its message arrives at 3.5 ms: done 5.5 ms, still before the output
    assert grouped.compute_s_per_node == pytest.approx([2e-3, 2e-3])
    plain = {**layer, "bytes_matrix": [[0, 0], [0, 0]], "received_macs_per_node": [0, 0]}
    assert _predict({**REPORT, "layers": [plain]}, _two_nodes()).latency_s < grouped.latency_s


@pytest.mark.parametrize("data, says", [
    ({"nodes": []}, "non-empty 'nodes'"),
    ({"nodes": [{"uplink_mbit_per_s": 10}]}, "no 'gmac_per_s'"),
    ({"nodes": [{"gmac_per_s": 0, "uplink_mbit_per_s": 10}]}, "positive"),
    ({"nodes": [{"gmac_per_s": 1, "uplink_mbit_per_s": -1}, {"gmac_per_s": 1, "uplink_mbit_per_s": 1}]}, "positive"),
    ({"nodes": [{"gmac_per_s": 1}, {"gmac_per_s": 1}]}, "uplink_mbit_per_s"),
    ({"nodes": [{"gmac_per_s": 1}, {"gmac_per_s": 1}], "mbit_per_s": [[None, 1]]}, "2x2 matrix"),
    ({"nodes": [{"gmac_per_s": 1}, {"gmac_per_s": 1}], "mbit_per_s": [[None, 1], [0, None]]}, "node 1 to node 0"),
])
def test_bad_topologies_are_refused_saying_what_to_fix(data, says):
    with pytest.raises(DiscoError, match=says):
        Topology.from_dict(data)


def test_a_switch_shorthand_gives_min_of_uplink_and_downlink_and_summed_delays(tmp_path):
    data = {"nodes": [{"gmac_per_s": 2, "uplink_mbit_per_s": 100, "delay_ms": 1},
                      {"gmac_per_s": 1, "uplink_mbit_per_s": 10, "downlink_mbit_per_s": 50, "delay_ms": 2}]}
    topology = Topology.from_dict(data)
    assert topology.bandwidth[0][1] == 50 * MBIT and topology.bandwidth[1][0] == 10 * MBIT
    assert topology.delay[0][1] == pytest.approx(3e-3)
    assert topology.speeds() == [1.0, 0.5]
    topology.save(tmp_path / "t.json")
    assert Topology.load(tmp_path / "t.json") == topology
    with pytest.raises(DiscoError, match="3 nodes"):
        topology.check_nodes(3)


def test_disco_plan_predicts_a_deployment_and_names_its_critical_path(tmp_path, capsys):
    torch.manual_seed(0)
    spec = tiny_model_spec()
    model = build_for_data(spec, channels=1, classes=10).eval()
    x = torch.randn(1, 1, 16, 16)
    simulated = disco.partition(model, nodes=3, example_inputs=x, node_weights=(2, 1, 1)).eval()
    keep_random_groups(simulated, 0.3, seed=0)
    export(simulated, tmp_path / "deploy", example_inputs=x, spec=ModelSpec(model=spec, channels=1, classes=10))
    topology = Topology.uniform(3, gmac_per_s=1.0, mbit_per_s=10.0, delay_ms=0.2, layer_overhead_ms=0.05)
    topology.save(tmp_path / "topology.json")
    from disco.cli.main import main  # in this process: its imports are paid once

    command = ["plan", str(tmp_path / "deploy"), "--topology", str(tmp_path / "topology.json")]
    assert main(command + ["--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    expected = predict(disco.cost_report(simulated, x).expected(), topology)  # the simulation's own cost report
    assert answer["latency_ms"] == pytest.approx(expected.latency_s * 1e3)
    assert sum(answer["critical_path_ms"].values()) == pytest.approx(answer["latency_ms"])
    assert main(command) == 0
    shown = capsys.readouterr().out
    assert "ms per image" in shown and "critical path by place" in shown
    Topology.uniform(2, gmac_per_s=1.0, mbit_per_s=10.0).save(tmp_path / "two.json")
    assert main(command[:-1] + [str(tmp_path / "two.json")]) == 2
    assert "3 nodes" in capsys.readouterr().err
