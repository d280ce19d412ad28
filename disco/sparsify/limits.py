"""What limits a cut: the whole split's bytes (GlobalBytes), each link's own bytes (PerLinkBytes), or the
predicted latency on a topology (LatencyLimit). A new kind of budget is one BudgetLimit subclass and its line in
`budget_limit`.

A limit decides which of the valued candidates (disco/sparsify/candidates.py) a cut keeps; the sparsifier writes
the masks, so it knows whether any changed (then BatchNorm statistics restart)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

import torch
from torch import nn

from disco.errors import DiscoError
from disco.split.partitioner import node_count
from disco.sparsify.budgets import link_fractions
from disco.sparsify.candidates import Candidates
from disco.sparsify.selection import cubic_target, keep_within_budget

if TYPE_CHECKING:
    from disco.sparsify.sparsifier import SparsifyOptions

MaskWriter = Callable[[dict[str, torch.Tensor]], None]  # sets the model's {layer: group mask}


class BudgetLimit(ABC):
    """Which candidates a cut keeps. `own_last_cut`: the schedule's last cut (at end_step) is this limit's
    `last_cut` instead of a cut to the schedule's budget."""

    own_last_cut = False

    @abstractmethod
    def keep(self, candidates: Candidates, target_ratio: float, step: int) -> torch.Tensor:
        """Bool per candidate: what a cut to `target_ratio` (of the dense price) after optimiser step `step`
        keeps, the most valuable first."""

    def last_cut(self, candidates: Candidates, write: MaskWriter) -> float:
        """The schedule's last cut where `own_last_cut`: writes the masks, returns the fraction of the dense price
        it reached."""
        raise DiscoError(f"{type(self).__name__} makes no last cut of its own")


class GlobalBytes(BudgetLimit):
    """One knapsack over the whole split: capacity target_ratio times the dense price (bytes; seconds with a
    latency budget)."""

    def __init__(self, dense_price: float):
        self.dense_price = dense_price

    def keep(self, candidates: Candidates, target_ratio: float, step: int) -> torch.Tensor:
        return self.within(candidates, target_ratio)

    def within(self, candidates: Candidates, target_ratio: float) -> torch.Tensor:
        return keep_within_budget(candidates.value, candidates.prices, target_ratio * self.dense_price)


@dataclass(frozen=True)
class LinkBudget:
    """links: {layer: [nodes, in_channels] the link each group crosses, src * nodes + dst}. fractions: [links]
    the byte fraction each link may carry (disco.sparsify.budgets.link_fractions, flattened)."""

    links: dict[str, torch.Tensor]
    fractions: torch.Tensor


def link_budget(model: nn.Module, layers: dict, costs: dict[str, torch.Tensor], link_budgets, budget: float
                ) -> LinkBudget:
    """The LinkBudget of SparsifyOptions.link_budgets (links not named keep `budget`) on `model`'s nodes."""
    nodes = node_count(model)
    fractions = torch.tensor(link_fractions(link_budgets, nodes, budget)).flatten()
    links = {}
    for name, layer in layers.items():
        source = layer.in_assign.clamp(min=0).to(costs[name].device)
        links[name] = source[None, :] * nodes + torch.arange(nodes, device=source.device)[:, None]
    return LinkBudget(links, fractions)


class PerLinkBytes(BudgetLimit):
    """Per-link budgets: every link its own knapsack, its capacity falling from its dense bytes to its own
    fraction of them as the schedule falls from 1 to the budget (the cubic's remaining share, by step)."""

    def __init__(self, budget: LinkBudget, options: SparsifyOptions):
        self.budget, self.options = budget, options  # the links follow the options' schedule

    def keep(self, candidates: Candidates, target_ratio: float, step: int) -> torch.Tensor:
        links = candidates.take(self.budget.links)
        options = self.options
        remaining = cubic_target(max(0, step - options.first_cut_step), options.end_step - options.first_cut_step,
                                 0.0)
        if target_ratio <= options.budget:  # the schedule's end, or the exact cut after a phase that ran short
            remaining = 0.0
        keep = torch.zeros_like(candidates.value, dtype=torch.bool)
        for link in links.unique().tolist():
            chosen = links == link
            fraction = float(self.budget.fractions[link])
            capacity = (fraction + (1 - fraction) * remaining) * float(candidates.prices[chosen].sum())
            keep[chosen] = keep_within_budget(candidates.value[chosen], candidates.prices[chosen], capacity)
        return keep


class LatencyTarget(Protocol):
    """A latency budget (disco.planning.prices.LatencyBudget): seconds of predicted latency per image."""

    seconds: float

    def latency(self, model: nn.Module) -> float: ...

    def check_reachable(self, model: nn.Module) -> None: ...


class LatencyLimit(GlobalBytes):
    """A latency budget: groups are priced in seconds on its topology, and every cut of the schedule is a
    GlobalBytes cut of priced seconds; the last cut keeps the largest priced fraction, in the same order of value,
    whose predicted latency is within the budget (groups dropped earlier come back, by value, if it allows)."""

    own_last_cut = True

    def __init__(self, target: LatencyTarget, model: nn.Module, dense_price: float):
        super().__init__(dense_price)
        self.target, self.model = target, model

    def last_cut(self, candidates: Candidates, write: MaskWriter) -> float:
        return self.largest_fraction(candidates, write)

    def cheapest_fraction(self, candidates: Candidates, write: MaskWriter) -> float:
        """Before any cut: the priced fraction at which keeping the cheapest groups meets the budget (the schedule
        aims there, and the last cut meets the budget with the groups training found important). Leaves those
        masks written."""
        return self.largest_fraction(candidates.valued(1.0 / candidates.prices), write)

    def largest_fraction(self, candidates: Candidates, write: MaskWriter, steps: int = 16) -> float:
        """Bisection: predicted latency only grows as the priced capacity (a prefix in value order) grows. Leaves
        the masks of the fraction returned written."""
        self.target.check_reachable(self.model)
        write(candidates.masks(self.within(candidates, 1.0)))
        if self.target.latency(self.model) <= self.target.seconds:
            return 1.0
        low, high = 0.0, 1.0
        for _ in range(steps):
            middle = (low + high) / 2
            write(candidates.masks(self.within(candidates, middle)))
            low, high = (middle, high) if self.target.latency(self.model) <= self.target.seconds else (low, middle)
        write(candidates.masks(self.within(candidates, low)))
        return low


def budget_limit(model: nn.Module, layers: dict, costs: dict[str, torch.Tensor], dense_price: float,
                 options: SparsifyOptions, latency: LatencyTarget | None) -> tuple[BudgetLimit, LinkBudget | None]:
    """The limit `options` (SparsifyOptions) and `latency` ask for, and the link budget if it is per link."""
    if latency is not None:
        if options.link_budgets:
            raise DiscoError("a latency budget prices every link already: give it or per-link budgets, not both")
        return LatencyLimit(latency, model, dense_price), None
    if options.link_budgets:
        links = link_budget(model, layers, costs, options.link_budgets, options.budget)
        return PerLinkBytes(links, options), links
    return GlobalBytes(dense_price), None
