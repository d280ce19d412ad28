"""User modules: data movement is followed exactly; what no rule splits as its operands lie moves data or
exchanges partial results (counted, listed in the cost report), and runs equal to the simulation."""
from pathlib import Path

import pytest
import torch
from torch import nn

import disco
from disco.export import ModelSpec, export
from disco.models import build_for_data
from disco.runtime.inprocess import run_in_process
from disco.split.masks import keep_random_groups
from disco.split.ops import Rule
from reference import hand_zeroed, hook_count


class Branchy(nn.Module):
    """cat, chunk, split, residual add, view/flatten, a depthwise conv and a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.left = nn.Conv2d(6, 6, 3, padding=1)
        self.right = nn.Conv2d(6, 10, 1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.bn = nn.BatchNorm2d(16)
        self.mix = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16 * 4 * 4, 7)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        a, b = torch.chunk(x, 2, dim=1)
        y = torch.cat([self.left(a), self.right(b)], dim=1)
        y = self.bn(self.depthwise(y))
        y = y + self.mix(y)
        first, second = y.split([8, 8], dim=1)
        y = torch.cat([second, first], 1)
        y = nn.functional.adaptive_avg_pool2d(y, 4)
        return self.head(y.view(y.size(0), -1))


class NeedsUnification(nn.Module):
    """Adds a concatenation of two convs to a third conv: their assignments must be made to agree."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(3, 8, 1)
        self.out = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        return self.out(torch.cat([self.a(x), self.b(x)], 1) + self.c(x))


@pytest.mark.parametrize("nodes", range(1, 9))
def test_user_module_dense_equals_original_and_masks_match_reference(nodes):
    model, x = Branchy().eval(), torch.randn(3, 3, 16, 16)
    simulated = disco.partition(model, nodes=nodes, example_inputs=x).eval()
    with torch.no_grad():
        torch.testing.assert_close(simulated(x), model(x), atol=1e-5, rtol=0)
    keep_random_groups(simulated, 0.3, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(simulated(x), hand_zeroed(model, simulated)(x), atol=1e-5, rtol=1e-4)
    report = disco.cost_report(simulated, x)
    assert report.traffic.bytes_matrix == hook_count(model, simulated, x, 4)
    if nodes == 1:
        assert report.traffic.dense_bytes == 0


def test_data_movement_is_followed_exactly():
    simulated = disco.partition(Branchy(), nodes=2, example_inputs=torch.randn(1, 3, 16, 16))
    layers = disco.disco_layers(simulated)
    stem = layers["stem"].out_assign
    # chunk: left reads channels 0..5 of the stem, right reads 6..11
    assert torch.equal(layers["left"].in_assign, stem[:6])
    assert torch.equal(layers["right"].in_assign, stem[6:])
    # depthwise conv stays local: its outputs live with its inputs, so it has no communication groups
    depthwise = layers["depthwise"]
    assert torch.equal(depthwise.out_assign, depthwise.in_assign)
    assert not depthwise.plan.possible_groups().any()
    # swap of halves then flatten: the head's input features follow the swapped channels, 16 positions each
    mix = layers["mix"].out_assign
    swapped = torch.cat([mix[8:], mix[:8]])
    assert torch.equal(layers["head"].in_assign, swapped.repeat_interleave(16))


def test_tensors_added_together_get_one_assignment():
    model, x = NeedsUnification().eval(), torch.randn(2, 3, 5, 5)
    simulated = disco.partition(model, nodes=2, example_inputs=x)
    layers = disco.disco_layers(simulated)
    concatenated = torch.cat([layers["a"].out_assign, layers["b"].out_assign])
    assert torch.equal(layers["c"].out_assign, concatenated)
    with torch.no_grad():
        torch.testing.assert_close(simulated(x), model(x), atol=1e-6, rtol=0)


LAYOUT_MODELS = str(Path(__file__).parent / "data" / "layout_models.py")


def _deployed(tmp_path, factory: str, nodes: int = 2):
    """The user's model partitioned, exported and run in process: (simulated, report, output, bytes sent)."""
    torch.manual_seed(0)
    spec = ModelSpec(model=f"{LAYOUT_MODELS}:{factory}", channels=3, classes=10)
    model = build_for_data(spec.model, channels=3, classes=10).eval()
    x = torch.randn(2, 3, 8, 8)
    simulated = disco.partition(model, nodes=nodes, example_inputs=x[:1]).eval()
    with torch.no_grad():
        torch.testing.assert_close(simulated(x), model(x), atol=1e-6, rtol=0)
    report = disco.cost_report(simulated, x[:1])
    export(simulated, tmp_path, example_inputs=x[:1], spec=spec)
    output, sent = run_in_process(tmp_path, x, model_code=LAYOUT_MODELS)
    with torch.no_grad():
        torch.testing.assert_close(output, model(x), atol=1e-5, rtol=1e-5)
    return simulated, report, sent


def _per_image(sent: list[list[int]], images: int = 2) -> list[list[int]]:
    return [[value // images for value in row] for row in sent]


def test_layer_reading_channels_along_another_dim_gets_its_input_moved(tmp_path):
    """conv b reads the 8 rows of a transposed map as channels: its input is moved to rows split in two halves."""
    simulated, report, sent = _deployed(tmp_path, "make_transposes")
    rows = disco.disco_layers(simulated)["b"].in_assign
    assert rows.tolist() == [0] * 4 + [1] * 4
    channels = disco.disco_layers(simulated)["a"].out_assign  # the map's channels (its dim 2 after the transpose)
    moved = [[0, 0], [0, 0]]
    for row in range(8):
        for channel in range(8):
            src, dst = int(channels[channel]), int(rows[row])
            if src != dst:
                moved[src][dst] += 8 * 4  # the row's 8 positions of that channel, fp32
    assert report.traffic.fallback_bytes_matrix == moved
    assert [entry.graph_node for entry in report.fallbacks] == ["conv2d_1"]
    assert _per_image(sent["fallback"]) == moved


def test_mean_over_split_channels_exchanges_partial_sums(tmp_path):
    _, report, sent = _deployed(tmp_path, "make_reduces_channels")
    expected = [[0, 8 * 8 * 4], [8 * 8 * 4, 0]]  # one fp32 partial sum per position, each node to the other
    assert report.traffic.norm_bytes_matrix == expected and report.traffic.fallback_bytes == 0
    assert _per_image(sent["norm"]) == expected


def test_operation_without_rule_runs_on_one_node_and_is_listed(tmp_path):
    _, report, sent = _deployed(tmp_path, "make_unknown_op")
    (entry,) = report.fallbacks
    assert entry.op == "aten.cummax" and entry.executor == 0 and "no rule" in entry.reason
    expected = [[0, 0], [4 * 8 * 8 * 4, 0]]  # node 1's 4 channels of 8x8 fp32 gathered on node 0
    assert report.traffic.fallback_bytes_matrix == expected and entry.bytes == sum(map(sum, expected))
    assert _per_image(sent["fallback"]) == expected


@torch.library.custom_op("disco_tests::doubled", mutates_args=())
def doubled(x: torch.Tensor) -> torch.Tensor:
    """An operation of the user's own, outside ATen: DISCO has no rule for it until one is registered."""
    return x * 2


@doubled.register_fake
def _(x):
    return torch.empty_like(x)


class DoublesBetweenLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 5, 1)

    def forward(self, x):
        return self.b(doubled(self.a(x)))


def test_a_registered_rule_replaces_the_fallback_of_a_custom_op():
    model, x = DoublesBetweenLayers().eval(), torch.randn(1, 3, 6, 6)

    def split_and_report():
        simulated = disco.partition(model, nodes=2, example_inputs=x).eval()
        with torch.no_grad():
            torch.testing.assert_close(simulated(x), model(x), atol=1e-6, rtol=0)
        return disco.cost_report(simulated, x)

    without_rule = split_and_report()
    (entry,) = without_rule.fallbacks
    assert entry.op == "disco_tests.doubled" and "disco.register_op_rule(op, rule)" in entry.reason
    assert without_rule.traffic.fallback_bytes > 0
    # the op exists only in this test: registering its rule for good changes no other test
    disco.register_op_rule(torch.ops.disco_tests.doubled.default, Rule.POINTWISE)
    with_rule = split_and_report()
    assert not with_rule.fallbacks and with_rule.traffic.fallback_bytes == 0



def test_a_single_node_partition_of_a_model_without_channels_is_refused():
    with pytest.raises(disco.DiscoError, match="no channel-mixing layer"):
        disco.partition(nn.ReLU(), nodes=2, example_inputs=torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("nodes", [0, -1, 65, 2.5, "2"])
def test_bad_node_counts_are_refused(nodes):
    with pytest.raises(disco.DiscoError, match="nodes"):
        disco.partition(Branchy(), nodes=nodes, example_inputs=torch.randn(1, 3, 16, 16))


def test_balanced_assignment_with_channels_not_divisible_by_nodes():
    from disco.split.assignment import balanced
    for channels in (1, 7, 10, 64):
        for nodes in range(1, 9):
            counts = torch.bincount(balanced(channels, nodes), minlength=nodes)
            assert counts.sum() == channels and counts.max() - counts.min() <= 1
