"""With groups removed, the simulation and the cost report agree with independent references."""
import math

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import disco
from disco.accounting.costs import ExpectedCosts
from disco.split.masks import keep_random_groups
from reference import hand_zeroed, hook_count, hook_message_bytes, plain_layers

CASES = [("resnet18", 2), ("resnet18", 4), ("mobilenet_v2", 3), ("resnext50_32x4d", 3), ("vgg11_bn", 2),
         ("densenet121", 4)]


def _setup(name, nodes, keep=0.2):
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    simulated = disco.partition(model, nodes=nodes, example_inputs=x).eval()
    keep_random_groups(simulated, keep, seed=nodes)
    return model, simulated, x


@pytest.mark.parametrize("name,nodes", CASES)
def test_masked_simulation_equals_hand_zeroed_reference(name, nodes):
    model, simulated, x = _setup(name, nodes)
    reference = hand_zeroed(model, simulated)
    with torch.no_grad():
        got, expected, dense = simulated(x), reference(x), model(x)
    scale = expected.abs().max()  # randomly initialised nets can have tiny outputs: compare relative to them
    torch.testing.assert_close(got / scale, expected / scale, atol=1e-5, rtol=1e-4)
    assert (got - dense).abs().max() > 1e-3 * dense.abs().max(), "masks must change the function"


@pytest.mark.parametrize("name,nodes,dtype,size", [(name, nodes, "fp32", 4) for name, nodes in CASES]
                         + [("resnet18", 3, "fp16", 2), ("resnet18", 2, "bf16", 2), ("mobilenet_v2", 2, "int8", 1),
                            ("resnet18", 4, "int4", 0.5)])
def test_cost_report_bytes_equal_hook_count(name, nodes, dtype, size):
    model, simulated, x = _setup(name, nodes)
    report = disco.cost_report(simulated, x, transport_dtype=dtype)
    if dtype.startswith("int"):  # codes plus a (low, step) pair per channel or per message
        expected = hook_message_bytes(model, simulated, x, int(dtype[3:]))
    else:
        expected = hook_count(model, simulated, x, size)
    assert report.traffic.bytes_matrix == expected
    assert report.traffic.bytes == sum(map(sum, expected))
    full = disco.partition(model, nodes=nodes, example_inputs=x)
    if dtype.startswith("int"):
        dense = hook_message_bytes(model, full, x, int(dtype[3:]))
        # the budget's ratio counts values; the (low, step) pairs add a little to both sides
        assert report.traffic.ratio == pytest.approx(report.traffic.bytes / report.traffic.dense_bytes, rel=0.05)
    else:
        dense = hook_count(model, full, x, size)
        assert report.traffic.ratio == pytest.approx(report.traffic.bytes / report.traffic.dense_bytes)
    assert report.traffic.dense_bytes == sum(map(sum, dense))
    assert 0.1 < report.traffic.ratio < 0.3  # a random 20% of groups


@pytest.mark.parametrize("name,nodes", CASES)
def test_macs_and_parameters_follow_the_masks(name, nodes):
    model, simulated, x = _setup(name, nodes)
    report = disco.cost_report(simulated, x)
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            model(x[:1])
    assert report.compute.model_macs == counter.get_total_flops() // 2
    assert sum(report.compute.dense_macs_per_node) == report.compute.model_macs

    # Hand count: every weight still non-zero in the hand-zeroed model costs one MAC per output position.
    dropped = {}
    reference = hand_zeroed(model, simulated, dropped)
    out_positions = {}

    def remember(name):
        def hook(module, inputs, output):
            out_positions.setdefault(name, output[0].numel() // output.shape[1])
        return hook
    hooks = [m.register_forward_hook(remember(n)) for n, m in plain_layers(reference).items()]
    with torch.no_grad():
        reference(x)
    for h in hooks:
        h.remove()
    layers = plain_layers(reference)
    kept_macs = sum((m.weight.numel() - dropped.get(n, 0)) * out_positions[n] for n, m in layers.items())
    assert sum(report.compute.macs_per_node) == kept_macs

    removed = sum(dropped.values()) * 4
    all_params = sum(p.numel() * 4 for p in model.parameters())
    assert sum(report.memory.dense_param_bytes_per_node) == all_params
    assert sum(report.memory.param_bytes_per_node) == all_params - removed
    assert report.memory.param_bytes_per_node != report.memory.dense_param_bytes_per_node


def test_report_is_json_serialisable_and_has_contract_keys():
    import json
    _, simulated, x = _setup("resnet18", 2)
    report = disco.cost_report(simulated, x)
    raw = json.loads(json.dumps(report.to_json()))
    for key in ("nodes", "dense_bytes", "bytes", "ratio", "bytes_matrix", "macs_per_node", "param_bytes_per_node",
                "io_bytes", "layers"):
        assert key in raw
    assert raw["io_bytes"] == {"input": report.traffic.io_bytes.input, "output": report.traffic.io_bytes.output}
    assert {key: raw[key] for key in report.expected().to_json()} == report.expected().to_json()  # a subset
    assert ExpectedCosts.from_json(report.expected().to_json()) == report.expected()
    with pytest.raises(TypeError, match=r"report\.traffic\.ratio"):  # read as the dict it was: told what to read
        report["ratio"]
    assert report.traffic.io_bytes.input == 3 * 64 * 64 * 4 * (2 - 1)
    assert report.traffic.io_bytes.output == 5 * 4  # classes 5..9 live on node 1


def test_example_from_design_doc_two_nodes_budget_fifth():
    """docs/method.md 2: N=2 keeping 20% of groups, each node does about 1/2*(1/2 + 1/2*0.2) = 0.3 of the MACs."""
    _, simulated, x = _setup("resnet50", 2, keep=0.2)
    report = disco.cost_report(simulated, x)
    shares = [m / report.compute.model_macs for m in report.compute.macs_per_node]
    assert all(math.isclose(s, 0.3, abs_tol=0.02) for s in shares)


def test_unpartitioned_model_is_refused():
    with pytest.raises(disco.DiscoError, match="partition"):
        disco.cost_report(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32))


def test_peak_activation_memory_matches_hand_count():
    from tests_helpers import load_tiny_model
    model, x = load_tiny_model(num_classes=10, in_channels=1).eval(), torch.zeros(1, 1, 12, 12)
    # One node: the peak is BatchNorm reading conv1's output (8x12x12) while writing its own: 2 * 1152 floats.
    one = disco.cost_report(disco.partition(model, nodes=1, example_inputs=x), x)
    assert one.memory.activation_bytes_per_node == [2 * 8 * 144 * 4]
    # Two nodes: at conv2 each node holds its 4 relu channels (4x144), its 8 conv2 outputs (8x36) and the
    # 4 channels it received (4x144): 1440 floats, more than BatchNorm's 2 * 4 * 144.
    two = disco.cost_report(disco.partition(model, nodes=2, example_inputs=x), x)
    assert two.memory.activation_bytes_per_node == [1440 * 4, 1440 * 4]
    assert two.memory.memory_bytes_per_node == [p + a for p, a in zip(two.memory.param_bytes_per_node,
                                                                   two.memory.activation_bytes_per_node)]
