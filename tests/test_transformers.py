"""Vision transformers: whole heads per node, LayerNorm partial sums, class token and position embedding
split by channel; simulation vs the original model, hand-zeroed references and hook counts; the runtime."""
from __future__ import annotations

import copy
import json

import pytest
import safetensors.torch
import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.swin_transformer import ShiftedWindowAttention

import disco
from disco.export import ModelSpec, export
from disco.models import build_for_data
from disco.split.attention import SplitAttention, replace_attention
from disco.split.window_attention import SplitWindowAttention
from disco.split.masks import keep_random_groups
from disco.training import pipeline
from disco.training.config import TrainConfig
from reference import hand_zeroed, hook_count
from runtime_helpers import disco_cli, make_deployment
from synthetic import make_image_folder


def _randomised(model: nn.Module) -> nn.Module:
    """torchvision zero-initialises the classifier; perturb every weight so outputs are informative."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_split_attention_equals_multihead_attention_and_loads_its_weights():
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(2, 5, 32)
    split = SplitAttention.from_multihead(mha).eval()
    torch.testing.assert_close(split(x, x, x)[0], mha(x, x, x, need_weights=False)[0], atol=1e-6, rtol=1e-5)
    fresh = SplitAttention(32, 4)
    fresh.load_state_dict(mha.state_dict())  # the original's packed in_proj keys
    torch.testing.assert_close(fresh.eval()(x, x, x)[0], mha(x, x, x, need_weights=False)[0], atol=1e-6, rtol=1e-5)


# node of every q channel, one row per head: ViT's first block; Swin's first (3 heads) and last (24) blocks
QUERY_HEADS = {
    "vit_b_16": lambda s: [s.encoder.layers[0].self_attention.q_proj.out_assign.reshape(12, -1)],
    "swin_t": lambda s: [b.attn.q.out_assign.reshape(-1, 32) for b in (s.features[1][0], s.features[7][1])],
}


@pytest.mark.parametrize("name,nodes", [("vit_b_16", 2), ("vit_b_16", 4), ("swin_t", 2), ("swin_t", 4)])
def test_dense_partition_equals_original(name, nodes):
    model = _randomised(torchvision.models.get_model(name))
    x = torch.randn(1, 3, 224, 224)
    simulated = disco.partition(model, nodes=nodes, example_inputs=x).eval()
    with torch.no_grad():
        torch.testing.assert_close(simulated(x), model(x), atol=1e-4, rtol=1e-4)
    for heads in QUERY_HEADS[name](simulated):
        assert bool((heads == heads[:, :1]).all())  # every head whole on one node
    assert sorted(set(heads[:, 0].tolist())) == list(range(nodes))


def _small_vit(layers: int = 2) -> nn.Module:
    return _randomised(build_for_data("disco:vit_small", channels=1, classes=10, num_layers=layers))


@pytest.mark.parametrize("nodes", [2, 4])
def test_small_vit_with_groups_removed_equals_hand_zeroed_reference(nodes):
    model = _small_vit()
    x = torch.randn(2, 1, 28, 28)
    simulated = disco.partition(model, nodes=nodes, example_inputs=x[:1]).eval()
    keep_random_groups(simulated, 0.3, seed=nodes)
    reference = replace_attention(copy.deepcopy(model)).eval()  # equivalent, checked above
    with torch.no_grad():
        torch.testing.assert_close(simulated(x), hand_zeroed(reference, simulated)(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("nodes", [2, 3])
def test_vit_costs_equal_independent_counts(nodes):
    model = _small_vit()
    x = torch.randn(1, 1, 28, 28)
    simulated = disco.partition(model, nodes=nodes, example_inputs=x).eval()
    keep_random_groups(simulated, 0.5, seed=1)
    report = disco.cost_report(simulated, x)
    reference = replace_attention(copy.deepcopy(model)).eval()
    assert report.traffic.bytes_matrix == hook_count(reference, simulated, x, 4)
    norms = sum(isinstance(m, nn.LayerNorm) for m in model.modules())  # 2 per block + final
    tokens = (28 // 4) ** 2 + 1
    assert report.traffic.norm_bytes == norms * tokens * 2 * 4 * nodes * (nodes - 1)
    # softmax(QK^T)V of each head counted on its node: tokens^2 x (32 + 32) MACs per head and layer
    heads = simulated.encoder.layers[0].self_attention.q_proj.out_assign[::32]
    per_head = tokens * tokens * 2 * 32
    assert report.compute.attention_macs_per_node == (2 * per_head * torch.bincount(heads, minlength=nodes)).tolist()
    # every parameter counted once across nodes (class token, position embedding and LayerNorms split)
    dense = disco.partition(model, nodes=nodes, example_inputs=x)
    assert sum(disco.cost_report(dense, x).memory.param_bytes_per_node) == report.memory.model_param_bytes


def test_class_token_and_position_embedding_are_split_by_channel(tmp_path):
    model = _small_vit()
    x = torch.randn(1, 1, 28, 28)
    simulated = disco.partition(model, nodes=2, example_inputs=x).eval()
    export(simulated, tmp_path, example_inputs=x, spec=ModelSpec(model="disco:vit_small", channels=1, classes=10,
                                                                 kwargs={"num_layers": 2}))
    channels = simulated.encoder.layers[0].self_attention.q_proj.in_assign
    for node in range(2):
        shard = safetensors.torch.load_file(str(tmp_path / f"node{node}.safetensors"))
        mine = (channels == node).nonzero().flatten()
        assert torch.equal(shard["class_token"], model.class_token.detach()[..., mine])
        assert torch.equal(shard["encoder.pos_embedding"], model.encoder.pos_embedding.detach()[..., mine])
        assert torch.equal(shard["encoder.ln.weight"], model.encoder.ln.weight.detach()[mine])


def test_split_window_attention_equals_torchvision_and_loads_its_weights():
    # 10x10 map, windows of 4: padded to 12x12, shifted windows with the region mask
    original = ShiftedWindowAttention(32, [4, 4], [2, 2], num_heads=4).eval()
    _randomised(original)
    x = torch.randn(2, 10, 10, 32)
    split = SplitWindowAttention.from_torchvision(original).eval()
    torch.testing.assert_close(split(x), original(x), atol=1e-5, rtol=1e-5)
    fresh = SplitWindowAttention(32, [4, 4], [2, 2], num_heads=4)
    fresh.load_state_dict(original.state_dict())  # the original's packed qkv and top-level bias table
    torch.testing.assert_close(fresh.eval()(x), original(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("nodes", [2, 4])
def test_swin_with_groups_removed_equals_hand_zeroed_reference_and_counts(nodes):
    """112x112: patch merging pads 7x7 to 8x8 and the last stage pads 4x4 to one 7x7 window."""
    model = _randomised(torchvision.models.swin_t())
    x = torch.randn(2, 3, 112, 112)
    simulated = disco.partition(model, nodes=nodes, example_inputs=x[:1]).eval()
    keep_random_groups(simulated, 0.3, seed=nodes)
    reference = replace_attention(copy.deepcopy(model)).eval()  # equivalent, checked above
    with torch.no_grad():
        expected = hand_zeroed(reference, simulated)(x)
        torch.testing.assert_close(simulated(x), expected, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(expected, model(x), atol=1e-3)  # the removed groups do matter
    report = disco.cost_report(simulated, x[:1])
    assert report.traffic.bytes_matrix == hook_count(reference, simulated, x[:1], 4)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x[:1])  # torchvision's own fused attention: linears, QK^T and AV as matmuls
    assert report.compute.model_macs == counter.get_total_flops() // 2
    dense = disco.cost_report(disco.partition(model, nodes=nodes, example_inputs=x[:1]), x[:1])
    assert sum(dense.memory.param_bytes_per_node) == report.memory.model_param_bytes  # bias tables split by head


class BadHeads(nn.Module):
    """User attention whose linear splits heads (12 channels, 4 heads of 3) across 5 nodes."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.ModuleList(nn.Linear(12, 12) for _ in range(3))

    def forward(self, x):
        q, k, v = (p(x).view(x.shape[0], x.shape[1], 4, 3).transpose(1, 2) for p in self.qkv)
        return F.scaled_dot_product_attention(q, k, v)


def test_heads_a_split_would_cut_are_kept_whole_by_reassigning_their_layers():
    """12 channels over 5 nodes cut heads of 3; the attention asks for whole heads, and q, k, v are re-assigned so
    (no data moves), with one head per node but one node without."""
    model, x = BadHeads().eval(), torch.randn(2, 6, 12)
    simulated = disco.partition(model, nodes=5, example_inputs=x[:1]).eval()
    layers = disco.disco_layers(simulated)
    heads = [layers[f"qkv.{i}"].out_assign.reshape(4, 3) for i in range(3)]
    assert all(bool((h == h[:, :1]).all()) for h in heads)  # every head whole on one node
    assert all(torch.equal(h, heads[0]) for h in heads)  # q, k and v of a head on the same node
    assert len(set(heads[0][:, 0].tolist())) == 4
    report = disco.cost_report(simulated, x[:1])
    assert report.traffic.fallback_bytes == 0 and report.fallbacks == ()
    with torch.no_grad():
        torch.testing.assert_close(simulated(x), model(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("nodes", [4])  # (2, 3 and 4 nodes in process: tests/test_runtime_inprocess.py)
def test_small_vit_distributed_equals_simulation(tmp_path, nodes):
    model = _small_vit()
    x = torch.randn(3, 1, 28, 28)
    simulated = disco.partition(model, nodes=nodes, example_inputs=x[:1]).eval()
    keep_random_groups(simulated, 0.3, seed=nodes)
    export(simulated, tmp_path, example_inputs=x[:1],
           spec=ModelSpec(model="disco:vit_small", channels=1, classes=10, kwargs={"num_layers": 2}))
    safetensors.torch.save_file({"input": x}, str(tmp_path / "x.safetensors"))
    result = disco_cli("run", str(tmp_path), "--input", str(tmp_path / "x.safetensors"), "--batch-size", "3",
                       "--save-output", str(tmp_path / "y.safetensors"), "--summary", str(tmp_path / "s.json"))
    assert result.returncode == 0, result.stderr
    with torch.no_grad():
        expected = simulated(x)
    torch.testing.assert_close(safetensors.torch.load_file(str(tmp_path / "y.safetensors"))["output"], expected,
                               atol=1e-4, rtol=1e-4)
    summary = json.loads((tmp_path / "s.json").read_text())
    report = disco.cost_report(simulated, x[:1])
    assert summary["bytes_sent"]["activations"] == [[b * 3 for b in row] for row in report.traffic.bytes_matrix]
    assert summary["bytes_sent"]["norm"] == [[b * 3 for b in row] for row in report.traffic.norm_bytes_matrix]


def test_swin_t_distributed_equals_simulation(tmp_path):
    """4 ranks at 112x112: patch merging and window padding on each rank, 3 heads on 4 nodes (one holds none)."""
    deployment = make_deployment(tmp_path, "swin_t", 4, size=112, images=2)
    result = disco_cli("run", str(tmp_path), "--input", str(deployment.input_file), "--batch-size", "2",
                       "--save-output", str(tmp_path / "y.safetensors"), "--summary", str(tmp_path / "s.json"),
                       timeout=300)
    assert result.returncode == 0, result.stderr
    with torch.no_grad():
        expected = deployment.simulated(deployment.inputs)
    torch.testing.assert_close(safetensors.torch.load_file(str(tmp_path / "y.safetensors"))["output"], expected,
                               atol=1e-4, rtol=1e-4)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["bytes_sent"]["activations"] == [[b * 2 for b in row] for row in deployment.costs.traffic.bytes_matrix]
    assert summary["bytes_sent"]["norm"] == [[b * 2 for b in row] for row in deployment.costs.traffic.norm_bytes_matrix]
    attention = deployment.simulated.features[1][0].attn
    heads = attention.q.out_assign[::32]
    for node in range(4):  # each shard holds the bias-table columns of its own heads only
        shard = safetensors.torch.load_file(str(tmp_path / f"node{node}.safetensors"))
        table = attention.attend.relative_position_bias_table.detach()[:, heads == node]
        assert torch.equal(shard["features.1.0.attn.attend.relative_position_bias_table"], table)


def test_vit_trains_to_a_budget_through_the_same_pipeline(tmp_path):
    images = make_image_folder(tmp_path / "images")
    config = TrainConfig(model="disco:vit_small", data=str(images), out=str(tmp_path / "run"), nodes=2, budget=0.2,
                         dense_epochs=1, sparsify_epochs=1, finetune_epochs=1, batch_size=16, lr=1e-3, min_phase_steps=0,
                         model_kwargs={"image_size": 16, "num_layers": 1, "hidden_dim": 32, "num_heads": 4,
                                       "mlp_dim": 64})
    report = pipeline.train(config)
    assert 0.196 <= report["ratio"] <= 0.2
