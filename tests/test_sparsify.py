"""The sparsifier meets the byte budget exactly, masks only shrink, and freezing freezes."""
import pytest
import torch
import torchvision
from torch import nn

import disco
from disco.errors import DiscoError
from disco.sparsify import Sparsifier, SparsifyOptions
from disco.sparsify.selection import cubic_target, keep_within_budget
from disco.training.loops import DistillationLoss
from tests_helpers import train_with_sparsifier


def _setup(nodes=3, budget=0.2, method="learned", steps=12):
    # resnet18 on 16x16 inputs: enough groups of varied sizes that a budget can be met to within 2%
    model = torchvision.models.resnet18(num_classes=4)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    simulated = disco.partition(model, nodes=nodes, example_inputs=x[:1])
    sparsifier = Sparsifier(simulated, x[:1], SparsifyOptions(budget=budget, total_steps=steps, method=method))
    return simulated, sparsifier, x, y


@pytest.mark.parametrize("budget", [0.5, 0.2, 0.1, 0.0])
@pytest.mark.parametrize("method", ["learned", "gates", "random"])
def test_budget_is_met_exactly(budget, method):
    simulated, sparsifier, x, y = _setup(budget=budget, method=method)
    train_with_sparsifier(simulated, sparsifier, 12, x, y)
    ratio = disco.cost_report(simulated, x[:1]).traffic.ratio  # the accounting, not the sparsifier's own sum
    assert ratio <= budget + 1e-9
    assert ratio >= 0.98 * budget
    assert sparsifier.ratio == pytest.approx(ratio)


def test_schedule_is_cubic_and_masks_only_shrink_until_the_final_fill():
    simulated, sparsifier, x, y = _setup(budget=0.1, steps=40)
    assert cubic_target(0, 30, 0.1) == 1.0 and cubic_target(30, 30, 0.1) == pytest.approx(0.1)
    assert cubic_target(15, 30, 0.1) == pytest.approx(0.1 + 0.9 * 0.125)
    ratios = []
    for _ in range(40):
        train_with_sparsifier(simulated, sparsifier, 1, x, y)
        ratios.append(sparsifier.ratio)
    assert all(b <= a + 0.02 for a, b in zip(ratios, ratios[1:]))
    assert ratios[29] <= 0.1 and ratios[-1] == ratios[29]  # reached at 75% of the steps, then held


def test_frozen_masks_stay_frozen():
    simulated, sparsifier, x, y = _setup(budget=0.3)
    train_with_sparsifier(simulated, sparsifier, 12, x, y)
    sparsifier.freeze()
    masks = {n: l.group_mask.clone() for n, l in disco.disco_layers(simulated).items()}
    train_with_sparsifier(simulated, sparsifier, 10, x, y)
    for name, layer in disco.disco_layers(simulated).items():
        assert torch.equal(layer.group_mask, masks[name])
        assert not layer.group_mask.requires_grad
    assert float(sparsifier.regularizer()) == 0.0
    with pytest.raises(DiscoError, match="frozen"):
        sparsifier.cut_to(0.1)


def test_frozen_sparsifier_ignores_steps():
    simulated, sparsifier, x, y = _setup(budget=0.3)
    sparsifier.freeze()
    before = {n: l.group_mask.clone() for n, l in disco.disco_layers(simulated).items()}
    train_with_sparsifier(simulated, sparsifier, 12, x, y)
    for name, layer in disco.disco_layers(simulated).items():
        assert torch.equal(layer.group_mask, before[name])


def test_a_cut_restarts_batch_norm_statistics_as_an_average_since_the_cut():
    """After a cut that changes the masks, each BatchNorm's running mean is the plain average of the batch
    means it saw since (read by a forward hook, the reference); freezing restores its momentum."""
    simulated, sparsifier, x, y = _setup(budget=0.3)
    norm = next(m for m in simulated.modules() if isinstance(m, nn.BatchNorm2d))
    seen = []
    norm.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().mean((0, 2, 3))))
    simulated.train()
    before = norm.running_mean.clone()
    sparsifier.cut_to(0.5)
    assert torch.equal(norm.running_mean, before)  # no batch yet: the old statistics stand (not zeros)
    seen.clear()
    batches = [torch.randn(8, 3, 16, 16) for _ in range(3)]
    with torch.no_grad():
        for batch in batches:
            simulated(batch)
    assert norm.momentum is None
    assert torch.allclose(norm.running_mean, torch.stack(seen).mean(0), atol=1e-6)
    before = norm.running_mean.clone()
    sparsifier.cut_to(0.5)  # the same groups: nothing changed, the statistics are kept
    assert torch.equal(norm.running_mean, before)
    sparsifier.freeze()
    assert norm.momentum == 0.1


def test_nested_budgets_are_each_met_and_never_regrown():
    """Budgets 0.5 > 0.2 > 0.1 from one schedule: after each is recorded, no later mask holds a group it dropped;
    each level's masks meet its budget by the accounting; fine-tuning then trains all of them."""
    model = torchvision.models.resnet18(num_classes=4)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    simulated = disco.partition(model, nodes=3, example_inputs=x[:1])
    sparsifier = Sparsifier(simulated, x[:1], SparsifyOptions(budget=0.1, nested=(0.2, 0.5), total_steps=20))
    layers = disco.disco_layers(simulated)
    recorded = 0
    for _ in range(20):
        train_with_sparsifier(simulated, sparsifier, 1, x, y)
        if sparsifier.nested.passed:
            allowed = sparsifier.nested.masks_at(sparsifier.nested.passed - 1)
            assert all(bool((layer.group_mask[~allowed[name]] == 0).all()) for name, layer in layers.items())
        recorded = max(recorded, sparsifier.nested.passed)
    assert recorded == 3 and sparsifier.nested.budgets == (0.5, 0.2, 0.1)
    ratios = []
    for index, budget in enumerate((0.5, 0.2, 0.1)):
        sparsifier.use_budget(index)
        ratio = disco.cost_report(simulated, x[:1]).traffic.ratio
        assert 0.95 * budget <= ratio <= budget + 1e-9
        ratios.append(ratio)
    sparsifier.freeze()
    seen = []
    for budget in sparsifier.step_budgets():  # fine-tuning trains every budget at each step
        sparsifier.use_budget(budget)
        seen.append(round(sparsifier.ratio, 6))
    assert seen == [round(r, 6) for r in ratios]
    sparsifier.after_epoch()
    assert sparsifier.ratio == pytest.approx(ratios[-1])


def test_learned_selection_prefers_important_groups():
    """Groups whose channels carry the signal are kept; groups of dead channels are dropped first."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 1), nn.Conv2d(8, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[1, 0:4] = 1.0  # output 1 (on node 1) reads channels 0..3 (on node 0)
        model[1].weight[0, 4:8] = 0.001  # output 0 (node 0) barely reads channels 4..7 (node 1)
    x = torch.randn(32, 1, 4, 4)
    y = (x.mean((1, 2, 3)) > 0).long()
    simulated = disco.partition(model, nodes=2, example_inputs=x[:1])
    sparsifier = Sparsifier(simulated, x[:1], SparsifyOptions(budget=0.5, total_steps=4, regularization=0))
    train_with_sparsifier(simulated, sparsifier, 4, x, y)
    mask = disco.disco_layers(simulated)["1"].group_mask
    assert bool((mask[1, 0:4] > 0).all()) and not bool((mask[0, 4:8] > 0).any())


def _signal_model():
    """Two nodes, one 1x1 conv mixing them: output 1 (node 1) reads channels 0..3 (node 0), output 0 (node 0)
    barely reads channels 4..7 (node 1)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 1), nn.Conv2d(8, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[1, 0:4] = 1.0
        model[1].weight[0, 4:8] = 0.001
    x = torch.randn(32, 1, 4, 4)
    return model, x, (x.mean((1, 2, 3)) > 0).long()


def test_gate_scores_sum_minus_the_gradient_of_each_group():
    """A gate's straight-through gradient is the mask's: after a few steps (before any cut) each group's score is
    minus the sum over steps of sum(W * dL/dW) over the group's weight slice (from the weights' own gradients)."""
    model, x, y = _signal_model()
    simulated = disco.partition(model, nodes=2, example_inputs=x[:1])
    sparsifier = Sparsifier(simulated, x[:1], SparsifyOptions(budget=0.5, total_steps=100, method="gates",
                                                              regularization=0))
    layer = disco.disco_layers(simulated)["1"]
    optimizer = torch.optim.SGD(simulated.parameters(), lr=0.05)
    expected = torch.zeros(2, 8)
    for _ in range(3):
        loss = nn.functional.cross_entropy(simulated(x), y)
        optimizer.zero_grad()
        loss.backward()
        contribution = (layer.weight * layer.weight.grad).flatten(1).detach()  # [outputs, in_channels]
        rows = torch.nn.functional.one_hot(layer.out_assign, 2).T.float()  # node of each output row
        expected -= rows @ contribution
        optimizer.step()
        sparsifier.step()
    remote = ~layer.plan.held()  # groups that cross the network (a node's own channels are no group)
    assert sparsifier.cuts == []
    torch.testing.assert_close(sparsifier.gate_scores["1"][remote], expected[remote], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("method", ["learned", "gates"])
def test_only_gates_bring_a_dropped_group_back(method):
    """The same budget, a dropped group now scoring best: gates swap it in for the worst kept group, the
    gradient-importance method keeps masks shrinking (dropped groups only fill what capacity is left)."""
    model, x, y = _signal_model()
    simulated = disco.partition(model, nodes=2, example_inputs=x[:1])
    sparsifier = Sparsifier(simulated, x[:1], SparsifyOptions(budget=0.5, total_steps=10, method=method))
    layer = disco.disco_layers(simulated)["1"]
    mask = layer.group_mask.clone()
    mask[1, 0] = 0  # drop one group of the signal...
    layer.set_group_mask(mask)
    ratio = sparsifier.ratio
    value = torch.where(layer.group_mask > 0, 1.0, 0.0)
    value[1, 0], value[0, 4] = 5.0, 0.5  # ...which now scores best; group (0, 4) the worst kept
    sparsifier.gate_scores["1"].copy_(value)
    sparsifier.importance["1"].copy_(value)
    sparsifier.cut_to(ratio)
    back = bool(layer.group_mask[1, 0] > 0)
    assert back == (method == "gates")
    assert bool(layer.group_mask[0, 4] > 0) == (method != "gates")
    assert sparsifier.ratio == pytest.approx(ratio)


def test_knapsack_respects_capacity_and_leaves_nothing_that_fits():
    generator = torch.Generator().manual_seed(3)
    for _ in range(50):
        costs = torch.randint(1, 20, (30,), generator=generator).float()
        value = torch.rand(30, generator=generator)
        capacity = float(torch.randint(0, 300, (1,), generator=generator))
        kept = keep_within_budget(value, costs, capacity)
        spent = float(costs[kept].sum())
        assert spent <= capacity
        assert all(spent + float(c) > capacity for c in costs[~kept])


@pytest.mark.parametrize("bad", [dict(budget=1.5), dict(budget=-0.1), dict(method="magic"), dict(total_steps=0)])
def test_bad_options_are_refused(bad):
    with pytest.raises(DiscoError):
        SparsifyOptions(**{"budget": 0.2, "total_steps": 10, **bad})


def test_distillation_loss_matches_hand_computation():
    teacher = nn.Linear(5, 3)
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 0])
    student = torch.randn(4, 3)
    loss = DistillationLoss(teacher, temperature=2.0, weight=0.25)(student, y, x)
    p_teacher = torch.softmax(teacher(x) / 2, 1)
    kl = (p_teacher * (p_teacher.log() - torch.log_softmax(student / 2, 1))).sum(1).mean()
    expected = 0.75 * nn.functional.cross_entropy(student, y) + 0.25 * 4 * kl
    torch.testing.assert_close(loss, expected.detach())


def test_loss_scaled_gradients_add_the_unscaled_importance_and_skipped_steps_none():
    """fp16 training scales the loss: a step's mask gradients carry the scale (divided out), and a step the scaler
    skipped for non-finite gradients adds nothing."""
    model, x, y = _signal_model()
    simulated = disco.partition(model, nodes=2, example_inputs=x[:1])
    plain = Sparsifier(simulated, x[:1], SparsifyOptions(budget=0.5, total_steps=100, regularization=0))
    layer = disco.disco_layers(simulated)["1"]
    for scale, skipped in ((1.0, False), (1024.0, False), (1024.0, True)):
        simulated.zero_grad()
        (nn.functional.cross_entropy(simulated(x), y) * scale).backward()
        if skipped:
            layer.group_mask.grad[0, 0] = float("inf")
        before = plain.importance["1"].clone()
        plain.step(gradient_scale=scale, skipped=skipped)
        added = plain.importance["1"] - before
        if scale == 1.0:
            reference = added
        elif not skipped:
            torch.testing.assert_close(added, reference, rtol=1e-4, atol=1e-12)
        else:
            assert torch.equal(added, torch.zeros_like(added))
