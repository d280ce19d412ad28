"""The runtime against the simulation on every model of the test suite, N = 2, 3, 4, random masks, in one process
(every rank a thread, MemoryComm): outputs == the simulation's, activation bytes == an independent count made
with forward hooks on the original model (tests/reference.py), norm bytes and io bytes == the cost report.
swin_t itself runs on 4 real processes in test_transformers.py; here torchvision's Swin at toy size."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

import disco
from disco.errors import DiscoError
from disco.export import ModelSpec, export
from disco.export.manifest import Manifest
from disco.models import build_for_data
from disco.runtime.comm import PeerFailure, memory_group
from disco.runtime.inprocess import run_in_process
from disco.runtime.fusion import BATCH_NORMS, Folded
from disco.runtime.program import load_program
from disco.split.attention import replace_attention
from disco.split.masks import keep_random_groups
from reference import hook_count, hook_message_bytes
from tests_helpers import tiny_model_spec

# spec, input channels, classes, input size, model kwargs
MODELS = {
    "tiny": (tiny_model_spec(), 1, 10, 16, {}),
    "resnet18": ("torchvision:resnet18", 3, 10, 32, {}),
    "resnet50": ("torchvision:resnet50", 3, 10, 32, {}),
    "vgg11_bn": ("torchvision:vgg11_bn", 3, 10, 32, {}),
    "mobilenet_v2": ("torchvision:mobilenet_v2", 3, 10, 32, {"width_mult": 0.5}),
    "densenet121": ("torchvision:densenet121", 3, 10, 32, {}),
    "resnext50_32x4d": ("torchvision:resnext50_32x4d", 3, 10, 32, {}),
    "vit_small": ("disco:vit_small", 1, 10, 28, {"num_layers": 2}),
    "swin": (tiny_model_spec().replace("make_model", "make_swin"), 3, 10, 36, {}),  # swin_t's code, toy size
    "fcn_resnet18": ("disco:fcn_resnet18", 1, 11, 32, {}),
    "retinanet_resnet18": ("disco:retinanet_resnet18", 1, 11, 64, {}),
    "edsr": ("disco:edsr", 3, 0, 16, {}),
}


def _randomised(spec: str, channels: int, classes: int, kwargs: dict) -> nn.Module:
    """Random weights, informative BatchNorm statistics, no zero-initialised layer."""
    torch.manual_seed(0)
    model = build_for_data(spec, channels=channels, classes=classes, **kwargs).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _deploy(folder, name: str, nodes: int, keep: float = 0.3, dtype: str = "fp32", node_weights=None):
    spec, channels, classes, size, kwargs = MODELS[name]
    original = _randomised(spec, channels, classes, kwargs)
    x = torch.randn(2, channels, size, size)
    simulated = disco.partition(original, nodes=nodes, example_inputs=x[:1], transport_dtype=dtype,
                                node_weights=node_weights).eval()
    keep_random_groups(simulated, keep, seed=nodes)
    export(simulated, folder, example_inputs=x[:1],
           spec=ModelSpec(model=spec, channels=channels, classes=classes, kwargs=kwargs))
    return original, simulated, x


def model_code(name: str) -> str | None:
    """The model file a deployment of MODELS[name] needs at run time (None for registered models)."""
    source = MODELS[name][0].rpartition(":")[0]
    return None if source in ("torchvision", "disco") else source


# the large models take seconds a case (vgg11_bn's 25088x4096 classifier, densenet121's 120 layers, the two
# 50-layer ResNets): one node count each, a different one per model; every count for the others
ONE_COUNT = {"vgg11_bn": 3, "densenet121": 4, "resnet50": 2, "resnext50_32x4d": 3}


@pytest.mark.parametrize("name,nodes", [(name, nodes) for name in MODELS for nodes in (2, 3, 4)
                                        if ONE_COUNT.get(name, nodes) == nodes])
def test_in_process_runtime_equals_simulation_and_hook_count(tmp_path, name, nodes):
    _check_runtime_against_simulation_and_hooks(tmp_path, name, nodes)


# more nodes than some layers have channels: the nodes that own none of a layer's channels compute and send
# nothing for it (tiny: 8-channel first layer; vit_small: 3 heads of 64 channels, 4-channel grey stem...)
@pytest.mark.parametrize("name, nodes", [("tiny", 9), ("tiny", 17), ("mobilenet_v2", 12), ("vit_small", 9)])
def test_nodes_without_channels_of_a_layer_still_match_the_simulation(tmp_path, name, nodes):
    _check_runtime_against_simulation_and_hooks(tmp_path, name, nodes)


def _check_runtime_against_simulation_and_hooks(tmp_path, name, nodes, node_weights=None):
    original, simulated, x = _deploy(tmp_path, name, nodes, node_weights=node_weights)
    output, sent = run_in_process(tmp_path, x, model_code=model_code(name))
    with torch.no_grad():
        expected = simulated(x)
    for actual, wanted in zip(tree_leaves(output), tree_leaves(expected), strict=True):
        torch.testing.assert_close(actual, wanted, atol=1e-4, rtol=1e-4)
    reference = replace_attention(copy.deepcopy(original))  # same function, q/k/v as separate linears
    hooks = hook_count(reference, simulated, x[:1], 4)
    assert sent["activations"] == [[b * len(x) for b in row] for row in hooks]
    costs = disco.cost_report(simulated, x[:1])
    assert sum(map(sum, sent["norm"])) == costs.traffic.norm_bytes * len(x)
    assert sum(map(sum, sent["input"])) == costs.traffic.io_bytes.input * len(x)
    assert sum(map(sum, sent["output"])) == costs.traffic.io_bytes.output * len(x)
    return simulated, x


# every transport dtype, CNNs (channels at dim 1, grouped convs) and the ViT (channels last), N = 2, 3, 4
QUANTIZED = [("resnet18", 2, "int8"), ("mobilenet_v2", 3, "int8"), ("vit_small", 4, "int8"), ("resnet50", 4, "int4"),
             ("vit_small", 2, "int4"), ("mobilenet_v2", 4, "fp16"), ("vit_small", 3, "bf16"), ("resnet18", 3, "bf16")]


@pytest.mark.parametrize("name, nodes, dtype", QUANTIZED)
def test_quantized_messages_equal_the_simulation_and_count_their_bytes(tmp_path, name, nodes, dtype):
    original, simulated, x = _deploy(tmp_path, name, nodes, dtype=dtype)
    output, sent = run_in_process(tmp_path, x, model_code=model_code(name))
    with torch.no_grad():
        expected = simulated(x)
        unrounded = disco.set_transport(copy.deepcopy(simulated), "fp32")(x)
    # Each received value is the simulation's rounding of what the sender holds (bit for bit:
    # test_quantization.py), but the sender's values differ from the simulation's in the last bits (float
    # summation order), and a value that close to a rounding boundary lands one step apart. So: near the
    # simulation everywhere, and far nearer to it than to the model without the rounding.
    for actual, wanted, plain in zip(tree_leaves(output), tree_leaves(expected), tree_leaves(unrounded), strict=True):
        scale = float(wanted.abs().max())
        torch.testing.assert_close(actual, wanted, atol=0.01 * scale, rtol=0)
        assert float((actual - wanted).abs().mean()) < 0.6 * float((actual - plain).abs().mean())
    if dtype.startswith("int"):
        hand = hook_message_bytes(replace_attention(copy.deepcopy(original)), simulated, x[:1], int(dtype[3:]))
    else:
        hand = hook_count(replace_attention(copy.deepcopy(original)), simulated, x[:1], 2)
    assert sent["activations"] == [[b * len(x) for b in row] for row in hand]
    costs = disco.cost_report(simulated, x[:1], transport_dtype=dtype)
    assert costs.traffic.bytes_matrix == hand
    assert sum(map(sum, sent["input"])) == costs.traffic.io_bytes.input * len(x)  # input and output stay fp32
    assert costs.traffic.io_bytes.input == x[0].numel() * 4 * (nodes - 1)


def test_manifest_sends_and_received_order_match_a_hand_reading_of_the_masks(tmp_path):
    _, simulated, _ = _deploy(tmp_path, "mobilenet_v2", 3)
    manifest = Manifest.load(tmp_path)
    for name, layer in disco.disco_layers(simulated).items():
        loaded = manifest.plans[name]
        in_assign, mask = layer.in_assign.tolist(), layer.group_mask.tolist()  # set_group_mask zeroes non-groups
        for src in range(3):
            for dst in range(3):
                hand = [c for c in range(len(in_assign)) if in_assign[c] == src != dst and mask[dst][c] > 0]
                assert loaded.sends()[src][dst].tolist() == hand, (name, src, dst)
        for node in range(3):  # what arrives, by sender, then channel
            hand = [c for src in range(3) if src != node for c in loaded.sends()[src][node].tolist()]
            assert loaded.received_channels(node).tolist() == hand


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet121"])
def test_batch_norms_after_convs_are_folded_and_outputs_still_equal_the_simulation(tmp_path, name):
    _, simulated, x = _deploy(tmp_path, name, 3)
    manifest = Manifest.load(tmp_path)
    for rank in range(3):
        program = load_program(manifest, tmp_path, rank, torch.device("cpu"))
        layer_calls = {call.graph_node for call in program.analysis.mixing}
        after_conv = {n for n in program.captured.graph_module.graph.nodes if n.target in BATCH_NORMS
                      and n.args[0].name in layer_calls and len(n.args[0].users) == 1}
        folded = {s.graph_node for s in program.steps if isinstance(s, Folded)}
        assert after_conv and folded == after_conv  # densenet's norms that follow a concat stay as they are
    output, _ = run_in_process(tmp_path, x)
    with torch.no_grad():
        torch.testing.assert_close(output, simulated(x), atol=1e-4, rtol=1e-4)


def test_batches_run_apart_give_the_simulation_outputs(tmp_path):
    _, simulated, x = _deploy(tmp_path, "resnet18", 2)
    apart, _ = run_in_process(tmp_path, x, batch_size=1)
    with torch.no_grad():
        torch.testing.assert_close(apart, simulated(x), atol=1e-4, rtol=1e-4)


def test_memory_comm_refuses_a_message_of_the_wrong_shape_and_times_out():
    first, second = memory_group(2, timeout=0.2)
    first.send(torch.zeros(3), 1, category="control", what="test")
    with pytest.raises(DiscoError, match="protocol error"):
        second.receive((4,), torch.float32, 0, what="test")
    with pytest.raises(PeerFailure, match="no answer from rank 0 within 0.2 s"):
        second.receive((4,), torch.float32, 0, what="test")


def test_a_deployment_of_the_previous_format_is_refused_with_a_way_forward(tmp_path):
    _deploy(tmp_path, "tiny", 2)
    path = tmp_path / "manifest.json"
    raw = json.loads(path.read_text())
    raw["version"] = 1
    path.write_text(json.dumps(raw))
    with pytest.raises(DiscoError, match="version 1.*export the deployment again"):
        Manifest.load(tmp_path)


def test_a_sends_table_naming_channels_the_sender_does_not_hold_is_refused(tmp_path):
    _, simulated, _ = _deploy(tmp_path, "tiny", 2)
    path = tmp_path / "manifest.json"
    raw = json.loads(path.read_text())
    name, plan = next((n, p) for n, p in raw["layers"].items() if p["sends"][0][1])
    plan["sends"][1][0] = plan["sends"][0][1]  # node 1 "sends" node 0's channels
    path.write_text(json.dumps(raw))
    with pytest.raises(DiscoError, match=f"layer '{name}'.*does not hold"):
        Manifest.load(tmp_path)


@pytest.mark.parametrize("name, nodes", [("resnet18", 2), ("mobilenet_v2", 3), ("vit_small", 4)])
def test_batches_in_flight_together_give_the_simulation_outputs_in_order(tmp_path, name, nodes):
    """--inflight: several batches in flight on every rank (one lane each); each image's output must be its own
    (any mix-up of lanes would hand an image another's channels) and bytes the same as one at a time."""
    _, simulated, _ = _deploy(tmp_path, name, nodes)
    spec, channels, _, size, _ = MODELS[name]
    x = torch.randn(7, channels, size, size, generator=torch.Generator().manual_seed(1))
    streamed, sent = run_in_process(tmp_path, x, batch_size=1, inflight=3, model_code=model_code(name))
    alone, sent_alone = run_in_process(tmp_path, x, batch_size=1, model_code=model_code(name))
    with torch.no_grad():
        torch.testing.assert_close(streamed, simulated(x), atol=1e-4, rtol=1e-4)
    assert {k: v for k, v in sent.items() if k != "control"} == {k: v for k, v in sent_alone.items() if k != "control"}
    header = 3 * 8  # each extra lane gets its own STOP header (status, batch, budget level: three int64) from rank 0
    assert sum(sent["control"][0]) == sum(sent_alone["control"][0]) + 2 * header * (nodes - 1)


def test_lanes_keep_their_messages_apart():
    """A message posted on one lane is received only on that lane, whatever the order of posting."""
    first, second = memory_group(2, timeout=0.5)
    lanes_first, lanes_second = first.lanes(3), second.lanes(3)
    for k in (2, 0, 1):
        lanes_first[k].send(torch.full((2,), float(k)), 1, category="activations", what="test")
    for k in range(3):
        assert lanes_second[k].receive((2,), torch.float32, 0, what="test").tolist() == [k, k]
    assert first.sent["activations"] == [0, 3 * 2 * 4]  # the lanes count into the rank's counters


@pytest.mark.parametrize("dtype, scale", [("fp16", 1e6), ("int8", 1e38)])
def test_values_a_dtype_cannot_carry_are_reported_not_sent_as_garbage(tmp_path, dtype, scale):
    _, _, x = _deploy(tmp_path, "resnet18", 2, dtype=dtype)
    with pytest.raises(DiscoError, match=f"NaN or Inf.*{dtype} cannot carry them"):
        run_in_process(tmp_path, x * scale)  # finite input (rank 0 accepts it); fp16 overflows, int8 meets inf


def test_a_manifest_whose_message_encoding_this_version_does_not_read_is_refused(tmp_path):
    _deploy(tmp_path, "tiny", 2, dtype="int8")
    path = tmp_path / "manifest.json"
    raw = json.loads(path.read_text())
    assert raw["transport_dtype"] == "int8" and raw["transport_scheme"]
    raw["transport_scheme"] = "affine-minmax-f16pair-v9"  # written by some other version
    path.write_text(json.dumps(raw))
    with pytest.raises(DiscoError, match="scheme 'affine-minmax-f16pair-v9'.*export the deployment again"):
        Manifest.load(tmp_path)
