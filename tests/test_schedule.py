"""Phase lengths and learning rates in steps (disco.training.schedule), and the sparsifier's cut schedule,
against torch's own cosine scheduler and a hand count."""
from __future__ import annotations

import pytest
import torch

from disco.errors import DiscoError
from disco.sparsify import SparsifyOptions
from disco.training.config import TrainConfig
from disco.training.schedule import schedule_phase, schedule_phases


def _config(**overrides) -> TrainConfig:
    values = dict(model="torchvision:resnet18", out="/tmp/never", epochs=2, lr=2e-3, sparse_lr_scale=0.5)
    return TrainConfig(**{**values, **overrides})


def test_small_data_gets_whole_epochs_until_the_minimum_steps():
    schedules = schedule_phases(_config(min_phase_steps=300), steps_per_epoch=32)  # 4,000 images at batch 128
    assert (schedules["dense"].epochs, schedules["dense"].lr, schedules["dense"].warmup_steps) == (2, 2e-3, 0)
    assert (schedules["sparsify"].epochs, schedules["sparsify"].asked_epochs, schedules["sparsify"].steps) == (10, 2, 320)
    assert schedules["finetune"].lr == pytest.approx(1e-3) and schedules["finetune"].warmup_steps == 16  # 5% of 320


def test_enough_data_runs_as_asked_and_zero_epochs_stay_zero():
    schedules = schedule_phases(_config(min_phase_steps=300), steps_per_epoch=469)  # 60,000 images
    assert [plan.epochs for plan in schedules.values()] == [2, 2, 2]
    assert schedule_phase(_config(finetune_epochs=0), "finetune", steps_per_epoch=1).epochs == 0


def test_without_warm_up_the_learning_rate_is_torchs_cosine():
    plan = schedule_phase(_config(), "dense", steps_per_epoch=7)
    ours, reference = [], []
    for build, seen in ((plan.scheduler, ours), (lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 14), reference)):
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=plan.lr)
        scheduler = build(optimizer)
        for _ in range(plan.steps):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
    assert ours == pytest.approx(reference, abs=1e-12)


def test_warm_up_rises_linearly_then_decays_to_zero():
    plan = schedule_phase(_config(min_phase_steps=0, lr_warmup=0.25), "sparsify", steps_per_epoch=10)  # 20 steps
    factors = [plan.lr_factor(step) for step in range(plan.steps + 1)]
    assert plan.warmup_steps == 5 and factors[:5] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6])
    assert factors[5] == 1.0 and all(b <= a for a, b in zip(factors[5:], factors[6:])) and factors[-1] == 0.0


def test_cuts_start_after_the_warm_up_and_keep_their_distance():
    options = SparsifyOptions(budget=0.1, total_steps=200, min_cut_interval=5)
    cut_steps = [step for step in range(1, 201) if options.is_cut_step(step)]
    # 10% of 200 before the first cut, the budget at 75%, about 20 cuts between, at least 5 steps apart
    assert options.first_cut_step == 20 and options.end_step == 150
    assert cut_steps[0] > 20 and cut_steps[-1] == 150 and min(b - a for a, b in zip(cut_steps, cut_steps[1:])) >= 5
    assert options.target_at(20) == 1.0 and options.target_at(150) == pytest.approx(0.1)
    assert options.target_at(85) == pytest.approx(0.1 + 0.9 * 0.5 ** 3)  # halfway: the cubic
    few = SparsifyOptions(budget=0.1, total_steps=40, min_cut_interval=5)  # 26 steps of schedule: every 5th
    assert [s for s in range(1, 41) if few.is_cut_step(s)] == [9, 14, 19, 24, 30]


def test_bad_schedules_are_refused():
    with pytest.raises(DiscoError, match="first_cut_fraction"):
        SparsifyOptions(budget=0.1, total_steps=10, first_cut_fraction=0.8)
    with pytest.raises(DiscoError, match="min-phase-steps"):
        _config(min_phase_steps=-1)
    with pytest.raises(DiscoError, match="lr-warmup"):
        _config(lr_warmup=1.0)
