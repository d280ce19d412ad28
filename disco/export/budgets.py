"""Deployments that carry several nested budgets (`disco export RUN --budgets ...`, docs/method.md 4 and 8).

A model trained with nested budgets b0 > b1 > ... keeps, at each budget, a subset of the groups of the larger
ones, with the same weights; only BatchNorm's running statistics differ per budget. So one deployment serves all
of them: the manifest's `layers` hold the plans of the largest budget (level 0), the shards its weight blocks,
and the manifest's `nested` field says once, for every channel a layer's plan sends, how many of the budgets
still send it (parallel to the plan's `sends` table: level k sends a channel iff its count is > k). Each shard
adds, for every level k >= 1, its BatchNorm statistics as `disco.budget{k}.NAME`. A run picks a level per batch
(the status header carries it, disco/runtime/protocol.py); each level's expected bytes and simulated score are
in the manifest too, so `disco run --budget B` is checked against its own simulation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from disco.errors import DiscoError
from disco.split.plan import SplitPlan

LEVEL_KEYS = "disco.budget"  # the start of every level's own shard keys (no model's state-dict key starts so)


def level_prefix(level: int) -> str:
    """The shard key prefix of level `level`'s own tensors (its BatchNorm statistics)."""
    return f"{LEVEL_KEYS}{level}."


@dataclass
class NestedBudgets:
    """The manifest's `nested` field, parsed and checked against the level-0 plans (see the module doc)."""

    budgets: list[float]  # largest first; level 0 is the manifest's own plans
    levels: dict[str, list]  # per layer: [src][dst] -> for each channel of sends[src][dst], budgets sending it
    expected: list[dict]  # per level: the simulation's cost report per image (bytes, bytes_matrix, ...)
    reference: list[dict | None]  # per level: the simulation's test score, as the manifest's `reference`
    default: int  # the level a run uses unless told otherwise (the budget the run was trained for)

    def to_json(self) -> dict:
        return {"budgets": self.budgets, "levels": self.levels, "expected": self.expected,
                "reference": self.reference, "default": self.default}

    @classmethod
    def from_json(cls, raw: dict, layers: dict[str, SplitPlan]) -> "NestedBudgets":
        try:
            nested = cls(budgets=[float(b) for b in raw["budgets"]], levels=dict(raw["levels"]),
                         expected=list(raw["expected"]), reference=list(raw["reference"]), default=int(raw["default"]))
        except (KeyError, TypeError, ValueError) as error:
            raise DiscoError(f"the manifest's nested budgets are malformed ({error}); export again") from None
        nested._check(layers)
        return nested

    def _check(self, layers: dict[str, SplitPlan]) -> None:
        count = len(self.budgets)
        if count < 2 or any(not 0 < b <= 1 for b in self.budgets) or self.budgets != sorted(self.budgets, reverse=True):
            raise DiscoError(f"nested budgets must be at least two fractions in (0, 1], largest first; got "
                             f"{self.budgets}")
        if len(self.expected) != count or len(self.reference) != count or not 0 <= self.default < count:
            raise DiscoError("the manifest's nested budgets need an expected cost and a reference per budget, and a "
                             "default among them")
        if set(self.levels) != set(layers):
            raise DiscoError("the manifest's nested levels do not name the layers it plans; export again")
        for name, plan in layers.items():
            table = self.levels[name]
            sends = plan.sends()
            shaped = isinstance(table, list) and len(table) == plan.nodes and all(
                isinstance(row, list) and len(row) == plan.nodes for row in table)
            if not shaped or any(len(table[s][d]) != sends[s][d].numel() for s in range(plan.nodes)
                                 for d in range(plan.nodes)):
                raise DiscoError(f"layer {name!r}: its nested levels do not match its plan's sends; export again")
            if any(not isinstance(n, int) or not 1 <= n <= count for row in table for cell in row for n in cell):
                raise DiscoError(f"layer {name!r}: nested levels must be whole numbers in 1..{count}")

    def level_of(self, budget: float | None) -> int:
        """The level of `budget` (None: the default); a budget the deployment does not carry is refused."""
        if budget is None:
            return self.default
        for level, carried in enumerate(self.budgets):
            if abs(carried - budget) < 1e-9:
                return level
        raise DiscoError(f"the deployment carries the budgets {', '.join(map(str, self.budgets))}; --budget {budget} "
                         "is not one of them")

    def plans_at(self, level: int, layers: dict[str, SplitPlan]) -> dict[str, SplitPlan]:
        """Every layer's plan at `level` (level 0: `layers` themselves)."""
        if level == 0:
            return dict(layers)
        return {name: _plan_at(plan, self.levels[name], level) for name, plan in layers.items()}


def _plan_at(plan: SplitPlan, table: list, level: int) -> SplitPlan:
    kept = torch.zeros(plan.nodes, plan.in_channels, dtype=torch.bool)
    for src, row in enumerate(plan.sends()):
        for dst, channels in enumerate(row):
            sent = torch.tensor(table[src][dst], dtype=torch.long) > level
            kept[dst, channels[sent]] = True
    return SplitPlan(nodes=plan.nodes, in_assign=plan.in_assign, out_assign=plan.out_assign,
                     conv_groups=plan.conv_groups, channel_dim=plan.channel_dim, mask=kept.float())


def levels_table(plan: SplitPlan, group_levels: torch.Tensor) -> list:
    """[src][dst]: for each channel of the plan's sends[src][dst], how many budgets keep its group (a layer's
    [nodes, in_channels] count of budgets, as nested.safetensors stores it)."""
    counts = group_levels.cpu()
    return [[counts[dst, channels].tolist() for dst, channels in enumerate(row)] for row in plan.sends()]


@dataclass
class NestedExport:
    """What export needs to write a deployment carrying several budgets of one nested model."""

    budgets: list[float]  # largest first
    group_levels: dict[str, torch.Tensor]  # per layer [nodes, in_channels]: how many of `budgets` keep each group
    norms: list[dict[str, torch.Tensor]]  # per budget: BatchNorm running statistics by state-dict name
    reference: list[dict | None]  # per budget: the simulation's test score
    default: int  # the budget a run uses unless told otherwise

    def __post_init__(self) -> None:
        if len(self.budgets) < 2 or len(self.norms) != len(self.budgets) or len(self.reference) != len(self.budgets):
            raise DiscoError("a deployment with nested budgets needs at least two budgets, each with its statistics")
