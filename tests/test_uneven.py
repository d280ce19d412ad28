"""Uneven splits (node weights, disco/split/balance.py): each node's share of every layer follows its weight, in
whole channels, heads and conv groups; the runtime still equals the simulation and sends what forward hooks count;
equal weights keep the long-standing split."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import disco
from disco.errors import DiscoError
from disco.options import PartitionOptions
from disco.split.assignment import balanced
from reference import output_shapes
from test_runtime_inprocess import MODELS, _check_runtime_against_simulation_and_hooks, _randomised

# CNNs (plain, depthwise, grouped) and transformers (heads, windows), N = 2, 3, 4
UNEVEN = [("tiny", 2, (3, 1)), ("mobilenet_v2", 3, (3, 2, 1)), ("resnext50_32x4d", 4, (2, 1, 1, 1)),
          ("vit_small", 4, (1, 2, 1, 3)), ("swin", 3, (2, 1, 1))]


@pytest.mark.parametrize("name, nodes, weights", UNEVEN)
def test_uneven_split_runtime_equals_simulation_and_hook_count(tmp_path, name, nodes, weights):
    simulated, x = _check_runtime_against_simulation_and_hooks(tmp_path, name, nodes, node_weights=weights)
    if len(set(weights)) > 1:  # the split really is uneven: the heaviest node computes the most rows
        rows = sum(torch.bincount(layer.out_assign, minlength=nodes) for layer in disco.disco_layers(simulated).values())
        assert int(rows.argmax()) == max(range(nodes), key=lambda k: weights[k])


def _macs_by_hand(original: nn.Module, simulated: nn.Module, x: torch.Tensor, nodes: int) -> list[int]:
    """Dense-split MACs per node, counted from each layer's output assignment and its output shape (hooks)."""
    outputs = output_shapes(original, x)
    macs = [0] * nodes
    for name, layer in disco.disco_layers(simulated).items():
        dim = 1 if isinstance(layer, nn.Conv2d) else -1
        positions = math.prod(outputs[name]) // outputs[name][dim]
        for k, rows in enumerate(torch.bincount(layer.out_assign, minlength=nodes).tolist()):
            macs[k] += rows * layer.weight[0].numel() * positions
    return macs


@pytest.mark.parametrize("name, nodes, weights", [("resnet18", 2, (2, 1)), ("mobilenet_v2", 4, (4, 2, 1, 1)),
                                                   ("resnext50_32x4d", 3, (1, 2, 3))])
def test_each_nodes_macs_follow_its_weight(name, nodes, weights):
    spec, channels, classes, size, kwargs = MODELS[name]
    original = _randomised(spec, channels, classes, kwargs)
    x = torch.randn(1, channels, size, size)
    simulated = disco.partition(original, nodes=nodes, example_inputs=x, node_weights=weights)
    macs = _macs_by_hand(original, simulated, x, nodes)
    for k in range(nodes):
        assert macs[k] / sum(macs) == pytest.approx(weights[k] / sum(weights), rel=0.05)
    assert disco.cost_report(simulated, x).compute.macs_per_node == macs  # the report counts the same


class FourGroups(nn.Module):
    """Convs with groups=4: three equal nodes cannot share one such layer evenly (one takes two groups)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 48, 1)
        self.grouped = nn.ModuleList(nn.Conv2d(48, 48, 3, padding=1, groups=4) for _ in range(6))

    def forward(self, x):
        x = self.stem(x)
        for conv in self.grouped:
            x = torch.relu(conv(x))
        return x


def test_grouped_convs_take_turns_carrying_the_extra_group():
    x = torch.randn(1, 3, 16, 16)
    model = FourGroups().eval()
    simulated = disco.partition(model, nodes=3, example_inputs=x)
    macs = _macs_by_hand(model, simulated, x, 3)
    assert max(macs) / sum(macs) <= 1.15 / 3  # each layer alone gives one node 2 of 4 groups (1.5x its share)
    for layer in list(disco.disco_layers(simulated).values())[1:]:  # and whole groups stay on one node
        assert all(len(set(group.tolist())) == 1 for group in layer.out_assign.reshape(4, -1))


@pytest.mark.parametrize("name", ["resnet18", "vit_small", "mobilenet_v2"])
def test_equal_weights_give_the_plain_split_and_plain_layers_the_contiguous_blocks(name):
    spec, channels, classes, size, kwargs = MODELS[name]
    original = _randomised(spec, channels, classes, kwargs)
    x = torch.randn(1, channels, size, size)
    plain = disco.partition(original, nodes=3, example_inputs=x)
    equal = disco.partition(original, nodes=3, example_inputs=x, node_weights=(2.5, 2.5, 2.5))
    for (name_, layer), other in zip(disco.disco_layers(plain).items(), disco.disco_layers(equal).values()):
        assert torch.equal(layer.out_assign, other.out_assign), name_
        if isinstance(layer, nn.Conv2d) and layer.groups == 1:  # (attention's q/k/v split in whole heads)
            assert torch.equal(layer.out_assign, balanced(layer.out_assign.numel(), 3)), name_


@pytest.mark.parametrize("weights, says", [((1, 1), "3 nodes"), ((1, 0, 1), "computes nothing"),
                                           ((1, -2, 1), "computes nothing"), ((1, float("nan"), 1), "number"),
                                           ((1, "a", 1), "number")])
def test_bad_node_weights_are_refused_saying_what_to_change(weights, says):
    with pytest.raises(DiscoError, match=says):
        PartitionOptions(nodes=3, node_weights=weights)
