"""Training to a latency budget (disco/planning/prices.py): groups priced by their time on a topology, the
sparsifier's last cut meeting the predicted latency, and a real (tiny) run with node weights and a latency budget
whose export predicts what its report says."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import disco
from disco.accounting.groups import group_bytes
from disco.errors import DiscoError
from disco.export.manifest import Manifest
from disco.models import build_for_data
from disco.planning.latency import predict
from disco.planning.prices import LatencyBudget, group_seconds
from disco.sparsify import Sparsifier, SparsifyOptions
from disco.sparsify.budgets import link_fractions, parse_link_budgets
from disco.topology import Topology
from disco.training import pipeline
from disco.training.config import TrainConfig
from disco.training.export_run import export_run
from reference import output_shapes
from synthetic import make_image_folder
from tests_helpers import tiny_model_spec

SLOW_NODE_3 = {"nodes": [{"gmac_per_s": 1.0, "uplink_mbit_per_s": 100, "layer_overhead_ms": 0.01}] * 3 +
               [{"gmac_per_s": 0.25, "uplink_mbit_per_s": 10, "layer_overhead_ms": 0.01}]}


def _model_and_input(nodes: int = 4):
    torch.manual_seed(0)
    model = build_for_data(tiny_model_spec(), channels=1, classes=10).eval()
    x = torch.randn(1, 1, 16, 16)
    return model, disco.partition(model, nodes=nodes, example_inputs=x), x


def test_a_groups_price_is_its_bytes_over_its_link_plus_its_macs_over_its_node():
    model, simulated, x = _model_and_input()
    topology = Topology.from_dict(SLOW_NODE_3)
    prices, sizes = group_seconds(simulated, x, topology), group_bytes(simulated, x)
    outputs = output_shapes(model, x)  # each layer's output shape, read with hooks on the original model
    checked = 0
    for name, layer in disco.disco_layers(simulated).items():
        positions = math.prod(outputs[name][2:]) if isinstance(layer, nn.Conv2d) else 1
        kernel = math.prod(layer.weight.shape[2:])
        in_per_group = layer.weight.shape[1]
        for k in range(4):
            for c in range(layer.in_assign.numel()):
                if sizes[name][k, c] == 0:
                    assert prices[name][k, c] == 0
                    continue
                src = int(layer.in_assign[c])
                group = c // in_per_group
                rows = int(((layer.out_assign == k) & (torch.arange(layer.out_assign.numel()) //
                                                        (layer.out_assign.numel() // layer.groups
                                                         if isinstance(layer, nn.Conv2d) else 1e9) == group)).sum())
                wanted = (float(sizes[name][k, c]) / topology.bandwidth[src][k]
                          + rows * kernel * positions / topology.nodes[k].macs_per_s)
                assert float(prices[name][k, c]) == pytest.approx(wanted, rel=1e-5)
                checked += 1
    assert checked > 0


def test_the_last_cut_meets_the_latency_budget_and_spares_the_slow_link():
    _, simulated, x = _model_and_input()
    topology = Topology.from_dict(SLOW_NODE_3)
    everything = predict(disco.cost_report(simulated, x).expected(), topology).latency_s
    budget = LatencyBudget(topology, everything * 0.6, x)
    sparsifier = Sparsifier(simulated, x, SparsifyOptions(budget=0.5, total_steps=1), latency=budget)
    sparsifier.cut_to_latency()
    report = disco.cost_report(simulated, x)
    assert predict(report.expected(), topology).latency_s <= budget.seconds
    dense = torch.tensor(report.traffic.dense_bytes_matrix, dtype=torch.float)
    kept = torch.tensor(report.traffic.bytes_matrix, dtype=torch.float)
    slow = (kept[3].sum() + kept[:, 3].sum()) / (dense[3].sum() + dense[:, 3].sum())
    fast = kept[:3, :3].sum() / dense[:3, :3].sum()
    assert slow < fast  # a byte over node 3's 10 Mbit/s link costs 10x one over the others
    with pytest.raises(DiscoError, match="cannot be met"):
        Sparsifier(simulated, x, SparsifyOptions(budget=0.5, total_steps=1),
                   latency=LatencyBudget(topology, 1e-6, x)).latency_fraction()


def test_a_run_with_node_weights_and_a_latency_budget_exports_what_it_reports(tmp_path):
    folder = make_image_folder(tmp_path / "images")
    topology = {"nodes": [{"gmac_per_s": 2.0, "uplink_mbit_per_s": 10, "layer_overhead_ms": 0.01},
                          {"gmac_per_s": 1.0, "uplink_mbit_per_s": 10, "layer_overhead_ms": 0.01}]}
    (tmp_path / "topology.json").write_text(json.dumps(topology))
    common = dict(model=tiny_model_spec(), data=str(folder), nodes=2, dense_epochs=1, sparsify_epochs=1,
                  finetune_epochs=1, batch_size=16, lr=1e-2, seed=0, min_phase_steps=0,
                  topology=str(tmp_path / "topology.json"))
    budget_ms = 5.0  # the dense split's ~12 KB per image take ~10 ms on these 10 Mbit/s links; nothing sent ~0.3 ms
    config = TrainConfig(out=str(tmp_path / "run"), latency_budget_ms=budget_ms, **common)
    assert config.node_weights == [1.0, 0.5]  # the topology's rates weight the split
    report = pipeline.train(config)
    assert report["predicted_latency_ms"] <= budget_ms
    export_run(tmp_path / "run", tmp_path / "deploy")
    manifest = Manifest.load(tmp_path / "deploy")
    rows = [sum(int((plan.out_assign == k).sum()) for plan in manifest.plans.values()) for k in (0, 1)]
    assert rows[0] > 1.5 * rows[1]  # node 0 computes about twice node 1's output channels
    exported = predict(manifest.expected_at(0), Topology.load(tmp_path / "topology.json")).latency_s * 1e3
    assert exported == pytest.approx(report["predicted_latency_ms"], rel=1e-6)
    with pytest.raises(DiscoError, match="needs --topology"):
        TrainConfig(out=str(tmp_path / "x"), latency_budget_ms=1.0, **{**common, "topology": None})
    with pytest.raises(DiscoError, match="3 nodes"):
        TrainConfig(out=str(tmp_path / "x"), latency_budget_ms=1.0, **{**common, "nodes": 3})
    with pytest.raises(DiscoError, match="byte budgets"):
        TrainConfig(out=str(tmp_path / "x"), latency_budget_ms=1.0, nested=[0.5], **common)


def test_per_link_budgets_hold_on_every_link_and_the_rest_keep_the_budget():
    _, simulated, x = _model_and_input()
    options = SparsifyOptions(budget=0.5, total_steps=10, link_budgets=tuple(parse_link_budgets("3=0.1,0-1=0.0")))
    sparsifier = Sparsifier(simulated, x, options)
    sparsifier.steps_done = options.end_step  # the schedule's end: every link at its own budget
    sparsifier.cut_to(0.5)
    report = disco.cost_report(simulated, x)
    kept = torch.tensor(report.traffic.bytes_matrix, dtype=torch.float)
    dense = torch.tensor(report.traffic.dense_bytes_matrix, dtype=torch.float)
    largest = max(float(c.max()) for c in group_bytes(simulated, x).values())
    for src in range(4):
        for dst in range(4):
            if src == dst or dense[src, dst] == 0:
                continue
            fraction = 0.0 if (src, dst) == (0, 1) else 0.1 if 3 in (src, dst) else 0.5
            assert kept[src, dst] <= fraction * dense[src, dst] + 1e-6
            assert kept[src, dst] > fraction * dense[src, dst] - largest - 1e-6  # filled to within one group


@pytest.mark.parametrize("text, says", [("0-3", "expected link budgets"), ("a=0.1", "expected link budgets"),
                                        ("0-1-2=0.1", "expected link budgets")])
def test_malformed_link_budgets_are_refused(text, says):
    with pytest.raises(DiscoError, match=says):
        parse_link_budgets(text)


@pytest.mark.parametrize("entries", [[[0, 4, 0.1]], [[1, 1, 0.1]], [[0, 1, 1.5]]])
def test_link_budgets_outside_the_deployment_are_refused(entries):
    with pytest.raises(DiscoError, match="nodes must be 0..3"):
        link_fractions(entries, 4, 0.2)


class SharedConv(nn.Module):
    """One conv called twice: it sends its channels once per call and computes twice."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.shared(torch.relu(self.shared(torch.relu(self.stem(x)))))


def test_a_layer_called_twice_pays_its_bytes_and_its_macs_per_call():
    x = torch.randn(1, 1, 6, 6)
    simulated = disco.partition(SharedConv().eval(), nodes=2, example_inputs=x)
    topology = Topology.from_dict({"nodes": [{"gmac_per_s": 1.0, "uplink_mbit_per_s": 8}] * 2})  # 1 MB/s
    price = group_seconds(simulated, x, topology)["shared"]
    layer = disco.disco_layers(simulated)["shared"]
    # channel 0 lives on node 0; node 1 computes 4 output rows reading it, 3x3 kernel, 36 positions, twice;
    # the channel (36 fp32 values, 144 B) crosses once per call
    assert int(layer.in_assign[0]) == 0 and int((layer.out_assign == 1).sum()) == 4
    assert float(price[1, 0]) == pytest.approx(2 * 144 / 1e6 + 2 * 4 * 9 * 36 / 1e9)
