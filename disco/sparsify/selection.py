"""Choosing groups to keep under a byte budget, and the schedule the budget follows."""
from __future__ import annotations

import torch


def cubic_target(step: int, end_step: int, budget: float) -> float:
    """Fraction of dense bytes allowed at `step`: 1 at step 0, falling as a cubic to `budget` at end_step
    (fast early, when many groups are cheap to drop; slow near the end, when each one matters)."""
    progress = min(1.0, step / end_step) if end_step > 0 else 1.0
    return budget + (1.0 - budget) * (1.0 - progress) ** 3


def keep_within_budget(value_per_byte: torch.Tensor, costs: torch.Tensor, capacity: float) -> torch.Tensor:
    """Bool mask over candidates: greedy knapsack by value per byte, then fill what still fits.

    Returns the kept set; its total cost is <= capacity and no left-out candidate would still fit.
    """
    order = torch.argsort(value_per_byte, descending=True, stable=True)
    sorted_costs = costs[order].double()
    kept_sorted = torch.cumsum(sorted_costs, 0) <= capacity + 1e-9
    spent = float(sorted_costs[kept_sorted].sum())
    cheapest = float(sorted_costs.min()) if len(order) else 0.0
    misses = (~kept_sorted).nonzero().flatten().tolist()
    miss_costs = sorted_costs[misses].tolist()
    for position, cost in zip(misses, miss_costs):  # fill what is left, in value order, with what still fits
        if capacity - spent < cheapest - 1e-9:
            break
        if spent + cost <= capacity + 1e-9:
            kept_sorted[position] = True
            spent += cost
    kept = torch.zeros_like(kept_sorted)
    kept[order] = kept_sorted
    return kept
