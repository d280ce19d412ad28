"""Learning which channels cross the network, inside any training loop.

    sparsifier = Sparsifier(model, example_inputs, SparsifyOptions(budget=0.2, total_steps=len(loader) * epochs))
    for x, y in loader:
        loss = criterion(model(x), y) + sparsifier.regularizer()
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        sparsifier.step()          # like an lr scheduler: advances the mask schedule
    sparsifier.freeze()            # masks fixed for fine-tuning

Method (docs/method.md 4): a group lasso over communication groups, each weighted by the bytes it costs,
pushes expensive groups towards zero; every `prune_every` steps the masks are cut to a cubic schedule
that reaches the byte budget exactly at `end_fraction` of the steps. Groups are ranked by first-order
importance (d loss / d mask, squared and summed since the last cut: what removing the group would cost)
per byte, and kept by a greedy knapsack, so the global budget goes where it buys accuracy. The "gates"
method gives every group a learned gate score trained jointly with the weights by a straight-through estimator
(the hard 0/1 mask in the forward pass, its gradient into the score), and each cut keeps the best scores per byte
among all groups, so a group dropped earlier can come back. The "random" method keeps random groups on the same
schedule (a baseline).

The parts: what ranks groups, one class per method (scoring.py); what limits a cut, one class per kind of budget:
the whole split's bytes, each link's, or a predicted latency (limits.py); the groups a cut chooses among
(candidates.py); the knapsack and the cubic (selection.py); nested budgets (nested.py). This module holds the
options and drives the schedule.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F

from disco.accounting.groups import group_bytes
from disco.errors import DiscoError
from disco.split.layers import DiscoLayer
from disco.split.modules import running_norms
from disco.split.partitioner import disco_layers
from disco.sparsify.budgets import check_nested
from disco.sparsify.candidates import Candidates, candidate_groups
from disco.sparsify.limits import budget_limit
from disco.sparsify.methods import METHODS
from disco.sparsify.nested import NestedLevels
from disco.sparsify.scoring import make_scorer, unused_tables
from disco.sparsify.selection import cubic_target


@dataclass(frozen=True, kw_only=True)
class SparsifyOptions:
    """budget: bytes allowed as a fraction of the dense split's, in [0, 1] (0 = no communication).
    total_steps: optimiser steps of the sparsification phase.
    end_fraction: the budget is reached after this fraction of total_steps (the rest trains with final masks).
    first_cut_fraction: no cut before this fraction of total_steps: the importance of every group is gathered
        over these steps, and the optimiser (restarted for the phase) settles, before anything is removed.
    prune_every: steps between mask cuts (0 = about 20 cuts over the schedule, at least min_cut_interval apart).
    min_cut_interval: fewest steps between two cuts when prune_every is 0: a cut ranks groups by the importance
        gathered since the last one, and a few steps' worth is noise (and the model needs steps to follow).
    regularization: strength of the bytes-weighted group lasso (0 disables it).
    method: "learned" (gradient importance), "gates" (learned gate scores) or "random" (baseline: random groups
        on the same schedule).
    nested: larger budgets whose masks contain the budget's (disco/sparsify/nested.py): the schedule cuts to
        each exactly as it passes it, and fine-tuning then trains all of them at every step.
    transport_dtype: the dtype whose bytes the budget counts (the ratio is the same for every dtype).
    link_budgets: per-link byte budgets, [(src, dst, fraction)] (dst -1: every link of node src; parsed by
        disco.sparsify.budgets.parse_link_budgets): each link (src -> dst) keeps at most that fraction of its own
        dense bytes, reached along the same schedule; links not named keep `budget`."""

    budget: float
    total_steps: int
    end_fraction: float = 0.75
    first_cut_fraction: float = 0.1
    prune_every: int = 0
    min_cut_interval: int = 5
    regularization: float = 1e-4
    method: str = "learned"
    nested: tuple[float, ...] = ()
    seed: int = 0
    transport_dtype: str = "fp32"
    link_budgets: tuple = ()

    def __post_init__(self) -> None:
        if not 0.0 <= self.budget <= 1.0:
            raise DiscoError(f"budget must be in [0, 1] (a fraction of the dense split's bytes), got {self.budget}")
        if self.total_steps < 1:
            raise DiscoError(f"total_steps must be at least 1, got {self.total_steps}")
        if not 0.0 < self.end_fraction <= 1.0:
            raise DiscoError(f"end_fraction must be in (0, 1], got {self.end_fraction}")
        if not 0.0 <= self.first_cut_fraction < self.end_fraction:
            raise DiscoError(f"first_cut_fraction must be in [0, end_fraction), got {self.first_cut_fraction}")
        if self.prune_every < 0 or self.regularization < 0 or self.min_cut_interval < 1:
            raise DiscoError("prune_every and regularization must not be negative, min_cut_interval at least 1")
        if self.method not in METHODS:
            raise DiscoError(f"unknown method {self.method!r}; known: {', '.join(METHODS)}")
        check_nested(tuple(self.nested), self.budget)
        if self.link_budgets and self.nested:
            raise DiscoError("nested budgets and per-link budgets cannot be combined: give one or the other")

    @property
    def budgets(self) -> tuple[float, ...]:
        """Every budget the masks are recorded at, largest first: the nested ones, then the budget."""
        return check_nested(tuple(self.nested), self.budget)

    @property
    def end_step(self) -> int:
        return max(1, round(self.total_steps * self.end_fraction))

    @property
    def first_cut_step(self) -> int:
        """Steps before the schedule starts falling (cuts happen after it)."""
        return min(self.end_step - 1, round(self.total_steps * self.first_cut_fraction))

    @property
    def cut_every(self) -> int:
        return self.prune_every or max(self.min_cut_interval, (self.end_step - self.first_cut_step) // 20)

    def is_cut_step(self, step: int) -> bool:
        """Masks are cut after optimiser step `step` (1-based): on the interval after the first cut step, and at
        end_step, where the budget is reached exactly (a regular cut too close before it is left out)."""
        since = step - self.first_cut_step
        return step == self.end_step or (0 < since and step <= self.end_step - self.min_cut_interval
                                         and since % self.cut_every == 0)

    def target_at(self, step: int) -> float:
        """The fraction of dense bytes allowed after `step`: 1 until the first cut step, then falling as a cubic
        to the budget at end_step."""
        return cubic_target(max(0, step - self.first_cut_step), self.end_step - self.first_cut_step, self.budget)


def group_norms(layer: DiscoLayer) -> torch.Tensor:
    """[nodes, in_channels]: L2 norm of each group's weight slice W[a_out == k, c] (differentiable)."""
    squares = layer.weight.pow(2).flatten(2).sum(-1) if layer.weight.dim() > 2 else layer.weight.pow(2)
    if layer.conv_groups == 1:
        rows_of_node = F.one_hot(layer.out_assign, layer.nodes).T.to(squares.dtype)
        per_group = rows_of_node @ squares
    else:
        rows = layer.out_assign[:, None].expand_as(squares)
        per_group = squares.new_zeros(layer.group_mask.shape).index_put((rows, layer.plan.input_columns()), squares,
                                                                       accumulate=True)
    return (per_group + 1e-12).sqrt()


class Sparsifier:
    """Drives a partitioned model's group masks to a byte budget during training (see module doc): a GroupScorer
    (disco/sparsify/scoring.py) values the groups, a BudgetLimit (disco/sparsify/limits.py) decides how many fit."""

    def __init__(self, model: nn.Module, example_inputs, options: SparsifyOptions, latency=None, group=None):
        """latency: a disco.planning.prices.LatencyBudget, or None. With one, groups are priced in seconds on its
        topology instead of bytes (the budget fraction then counts priced seconds), and the last cut keeps as
        many groups as its predicted latency allows.
        group: data-parallel training (disco.training.data_parallel.DataParallel): the masks' gradients are
        averaged over its processes before they count, and each cut's masks are rank 0's on every process."""
        self.options, self.group = options, group
        self.model, self.latency = model, latency
        self._changed = False  # whether the cut in progress changed any mask (then BatchNorm statistics restart)
        self.layers = disco_layers(model)
        if not self.layers:
            raise DiscoError("Sparsifier needs a partitioned model: call disco.partition first")
        self.costs = {name: c.to(layer.group_mask.device)
                      for (name, c), layer in zip(group_bytes(model, example_inputs, options.transport_dtype).items(),
                                                  self.layers.values())}
        self.dense_bytes = float(sum(c.sum() for c in self.costs.values()))
        self.prices = self.costs if latency is None else {
            name: price.to(self.costs[name].device).float() for name, price in latency.prices(model).items()}
        self.dense_price = float(sum(p.sum() for p in self.prices.values()))
        existing = torch.cat([p[p > 0] for p in self.prices.values()])
        self._mean_cost = float(existing.mean()) if existing.numel() else 1.0
        self.limit, self.link_budget = budget_limit(model, self.layers, self.costs, self.dense_price, options, latency)
        self._generator = torch.Generator().manual_seed(options.seed)
        self.scorer = make_scorer(options.method, self.costs, self._generator)
        self.steps_done = 0
        self.cuts: list[dict] = []  # every cut: after which step, to what target, the ratio reached
        self.frozen = False
        # BatchNorm layers keep running statistics for evaluation; a cut changes what they normalise
        self._norms = running_norms(model)
        self._norm_momenta = [m.momentum for m in self._norms]
        self.nested = (NestedLevels(options.budgets, {n: c > 0 for n, c in self.costs.items()})
                       if options.nested else None)
        self._track_mask_gradients(True)
        if latency is not None:  # the schedule aims at the priced fraction that meets the latency budget
            self.options = replace(options, budget=self.latency_fraction())

    @property
    def importance(self) -> dict[str, torch.Tensor]:
        """"learned": {layer: each group's squared mask gradient summed since the last cut} (zeros otherwise)."""
        return self._score_table("importance")

    @property
    def gate_scores(self) -> dict[str, torch.Tensor]:
        """"gates": {layer: each group's gate score} (zeros otherwise)."""
        return self._score_table("gate_scores")

    def _score_table(self, key: str) -> dict[str, torch.Tensor]:
        tables = self.scorer.tables()
        return tables[key] if key in tables else unused_tables(self.scorer, self.costs)[key]

    # --- the training-loop interface ---------------------------------------------------------------
    def regularizer(self) -> torch.Tensor:
        """Bytes-weighted group lasso over the groups still kept (add it to the loss)."""
        device = next(iter(self.layers.values())).weight.device
        if self.frozen or self.options.regularization == 0:
            return torch.zeros((), device=device)
        total = torch.zeros((), device=device)
        for name, layer in self.layers.items():
            weight = self.prices[name] / self._mean_cost * (layer.group_mask.detach() > 0)
            total = total + (weight * group_norms(layer)).sum()
        return self.options.regularization * total

    def step(self, gradient_scale: float = 1.0, skipped: bool = False) -> None:
        """Call once per optimiser step, after backward: gathers importance, cuts masks on schedule.
        `gradient_scale`: what a loss scaler (fp16 training) multiplied the gradients by; `skipped`: the scaler
        found them non-finite and skipped the optimiser's step (this step then adds no importance)."""
        if self.frozen:
            return
        self._gather(gradient_scale, skipped)
        self.steps_done += 1
        if self.options.is_cut_step(self.steps_done):
            target, last = self.options.target_at(self.steps_done), None
            for last in self.nested.due(target) if self.nested is not None else ():
                self.cut_to(last)  # exactly each nested budget the schedule passes, recorded
                self.nested.record({n: layer.group_mask.detach() for n, layer in self.layers.items()})
            if self.limit.own_last_cut and self.steps_done == self.options.end_step:
                self._last_cut()
            elif last is None or last > target:
                self.cut_to(target)

    def step_budgets(self) -> list[int | None]:
        """Which budgets one optimiser step trains: with nested budgets, fine-tuning trains every one of them at
        each step (the training loop sets each with use_budget, accumulates its gradients, then steps once; the
        run's own budget last); otherwise [None]: the masks as they are. Measured: fine-tuning one budget per
        step in turn left each budget 2-3 points below a model trained for it alone (4,000 images, 4 nodes)."""
        if self.frozen and self.nested is not None:
            return list(range(len(self.nested.budgets)))
        return [None]

    def after_epoch(self) -> None:
        """Call after each training epoch: nested fine-tuning leaves the masks of the run's own budget set (the
        one evaluated and saved)."""
        if self.frozen and self.nested is not None:
            self.use_budget(len(self.nested.budgets) - 1)

    def use_budget(self, index: int) -> None:
        """Nested: set the masks of budget number `index` (0: the largest; the last is the run's budget)."""
        if self.nested is None or not self.nested.complete:
            raise DiscoError("no nested budgets recorded: train with nested budgets through the sparsify phase")
        for name, mask in self.nested.masks_at(index).items():
            self.layers[name].set_group_mask(mask)

    def freeze(self) -> None:
        """Fix the masks (fine-tuning): step() and regularizer() do nothing from now on."""
        self.frozen = True
        self._track_mask_gradients(False)
        for norm, momentum in zip(self._norms, self._norm_momenta):
            norm.momentum = momentum

    def _restart_norm_statistics(self) -> None:
        """After a cut, BatchNorm's running statistics describe channels that are no longer sent: they restart
        as a plain average of the batches seen since (momentum None, the batch count zeroed: the first batch
        replaces them). Left to their exponential average they lag the cuts, and evaluation between cuts
        measured 29% where the same weights score 49% with fresh statistics (4,000 images, 4 nodes). Until a
        batch arrives the old statistics stay: reset to 0 and 1 instead, an evaluation right after a cut scored
        chance. Training itself uses batch statistics and is unaffected."""
        for norm in self._norms:
            norm.num_batches_tracked.zero_()
            norm.momentum = None

    @property
    def ratio(self) -> float:
        """Current bytes as a fraction of the dense split's."""
        return self.kept_bytes() / self.dense_bytes if self.dense_bytes else 0.0

    def kept_bytes(self) -> float:
        return float(sum((c * (self.layers[n].group_mask.detach() > 0)).sum() for n, c in self.costs.items()))

    # --- mask selection ----------------------------------------------------------------------------
    def cut_to(self, target_ratio: float) -> None:
        """Keep the most valuable groups per byte (per priced second with a latency budget) within target_ratio
        times the dense split's total (each link's own share of it with per-link budgets).

        Groups still kept rank first (by importance per byte, or at random); groups dropped earlier rank
        after all of them and only fill capacity left over by the granularity of groups, so the budget is
        met to within the smallest group while masks otherwise only ever shrink."""
        candidates = self._candidates()
        self._write_masks(candidates.masks(self.limit.keep(candidates, target_ratio, self.steps_done)))
        self._after_cut(target_ratio)

    def cut_to_latency(self) -> None:
        """The last cut of a latency-budget run: the largest priced fraction, in the same order of value, whose
        predicted latency is within the budget (groups dropped earlier come back, by value, if it allows)."""
        if self.latency is None:
            raise DiscoError("cut_to_latency needs a Sparsifier made with a latency budget (latency=...)")
        self._last_cut()

    def _last_cut(self) -> None:
        self._after_cut(self.limit.last_cut(self._candidates(), self._write_masks))

    def latency_fraction(self) -> float:
        """Before any cut: the priced fraction at which keeping the cheapest groups meets the latency budget; the
        schedule aims there, and the last cut meets the budget with the groups training found important."""
        if self.latency is None:
            raise DiscoError("latency_fraction needs a Sparsifier made with a latency budget (latency=...)")
        candidates = self._candidates()  # valued, and so drawn by "random", as ever: seeded runs repeat
        masks = {name: layer.group_mask.detach().clone() for name, layer in self.layers.items()}
        fraction = self.limit.cheapest_fraction(candidates, self._write_masks)
        for name, mask in masks.items():  # the masks as they were: only the fraction counts
            self.layers[name].set_group_mask(mask)
        self._changed = False
        return fraction

    def _candidates(self) -> Candidates:
        """Every group a cut may keep, valued by the scorer."""
        if self.frozen:
            raise DiscoError("masks are frozen (fine-tuning): cutting would change what is sent")
        groups = candidate_groups(self.layers, self.costs, self.prices,
                                  self.nested.allowed if self.nested is not None else None)
        was_kept = groups.take({name: layer.group_mask.detach() > 0 for name, layer in self.layers.items()})
        return groups.valued(self.scorer.value(groups, was_kept))

    def _write_masks(self, masks: dict[str, torch.Tensor]) -> None:
        for name, mask in masks.items():
            before = self.layers[name].group_mask.detach() > 0
            self.layers[name].set_group_mask(mask)
            self._changed = self._changed or not torch.equal(before, self.layers[name].group_mask.detach() > 0)

    def _after_cut(self, target_ratio: float) -> None:
        if self.group is not None:  # every process computed the same cut; rank 0's is the one, bit for bit
            self.group.share([layer.group_mask for layer in self.layers.values()])
        self.scorer.after_cut()
        self.cuts.append({"step": self.steps_done, "target": round(target_ratio, 6), "ratio": round(self.ratio, 6)})
        if self._changed:
            self._restart_norm_statistics()
        self._changed = False

    def _gather(self, gradient_scale: float = 1.0, skipped: bool = False) -> None:
        """The step's mask gradients, unscaled and averaged over processes, to the scorer; a layer's non-finite
        gradient, or a skipped step's, adds nothing."""
        gradients = {name: layer.group_mask.grad.detach() / gradient_scale for name, layer in self.layers.items()
                     if layer.group_mask.grad is not None}
        for layer in self.layers.values():
            layer.group_mask.grad = None
        if self.group is not None:  # the gradient of the global batch's loss, as one process would see it
            self.group.average(list(gradients.values()))
        if skipped:
            return
        self.scorer.gather({name: g for name, g in gradients.items() if bool(torch.isfinite(g).all())})

    def _track_mask_gradients(self, enabled: bool) -> None:
        for layer in self.layers.values():
            layer.group_mask.requires_grad_(enabled)
            layer.group_mask.grad = None

    # --- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The schedule's progress, the nested levels and the scorer's state (with zero tables for the score keys
        another method keeps: the keys every checkpoint has always had)."""
        unused = {key: {n: t.cpu() for n, t in table.items()}
                  for key, table in unused_tables(self.scorer, self.costs).items()}
        return {"steps_done": self.steps_done, "frozen": self.frozen, "generator": self._generator.get_state(),
                "cuts": list(self.cuts),
                "nested": self.nested.state_dict() if self.nested is not None else None,
                **unused, **self.scorer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.steps_done = int(state["steps_done"])
        self.cuts = list(state.get("cuts", []))
        if self.nested is not None and state.get("nested") is not None:
            self.nested.load_state_dict(state["nested"])
        if self.cuts and not state["frozen"]:  # the statistics in the checkpoint are an average since the last cut
            for norm in self._norms:
                norm.momentum = None
        self._generator.set_state(state["generator"])
        self.scorer.load_state_dict(state)
        if state["frozen"]:
            self.freeze()
