"""Nested budgets: one model whose masks at budgets b0 > b1 > ... > bL-1 (the run's --budget) are nested, so one
set of weights serves every budget and a deployment can send less when the link slows (docs/method.md 4).

The sparsifier's schedule passes every budget on its way down to the smallest: it cuts to each one exactly as it
passes it and records which groups are kept there. From then on only those groups may be kept (a later cut
never brings back a group the larger budget dropped), so the kept sets are nested by construction. A group's
*level* is how many of the budgets keep it (0: none; L: all, i.e. it is in the smallest): the masks of budget k
are `level > k`, and that one tensor per layer stores the nested order once.
"""
from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch

from disco.errors import DiscoError
from disco.files import write_bytes_atomically  # files a kill leaves whole

NESTED = "nested.safetensors"  # a run folder's nested order: each layer's group levels, the budgets as metadata



class NestedLevels:
    """The levels of one sparsifier's groups, as its schedule passes each budget (see the module doc)."""

    def __init__(self, budgets: tuple[float, ...], possible: dict[str, torch.Tensor]):
        self.budgets = budgets
        self.level = {name: torch.zeros(mask.shape, dtype=torch.uint8, device=mask.device)
                      for name, mask in possible.items()}
        self.allowed = {name: mask.clone() for name, mask in possible.items()}
        self.passed = 0  # budgets recorded so far

    def due(self, target: float) -> list[float]:
        """The budgets not yet recorded that a cut to `target` reaches or passes (in order, largest first)."""
        return [b for b in self.budgets[self.passed:] if b >= target - 1e-12]

    def record(self, masks: dict[str, torch.Tensor]) -> None:
        """The masks of the next budget: their groups gain a level and are all that later cuts may keep."""
        if self.passed >= len(self.budgets):
            raise DiscoError("every nested budget is recorded already")
        for name, mask in masks.items():
            kept = mask > 0
            self.level[name] += kept.to(torch.uint8)
            self.allowed[name] = kept.clone()
        self.passed += 1

    @property
    def complete(self) -> bool:
        return self.passed == len(self.budgets)

    def masks_at(self, index: int) -> dict[str, torch.Tensor]:
        """The masks of budget number `index` (0: the largest)."""
        return {name: level > index for name, level in self.level.items()}

    def state_dict(self) -> dict:
        return {"passed": self.passed, "level": {n: t.cpu() for n, t in self.level.items()},
                "allowed": {n: t.cpu() for n, t in self.allowed.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.passed = int(state["passed"])
        for name in self.level:
            self.level[name].copy_(state["level"][name])
            self.allowed[name] = state["allowed"][name].to(self.allowed[name].device)


def save_levels(levels: NestedLevels, norm_statistics: list[dict[str, torch.Tensor]], path: Path) -> None:
    """The nested order, once: each layer's group levels (uint8), and each budget's BatchNorm statistics
    (`norms/K/NAME`: a norm normalises other channels at each budget); the budgets in the metadata."""
    tensors = {f"levels/{name}": level.cpu().contiguous() for name, level in levels.level.items()}
    for index, statistics in enumerate(norm_statistics):
        tensors.update({f"norms/{index}/{name}": value.cpu().contiguous() for name, value in statistics.items()})
    metadata = {"budgets": json.dumps(list(levels.budgets))}
    write_bytes_atomically(path, safetensors.torch.save(tensors, metadata=metadata), "the budget levels")


def load_levels(path: Path) -> tuple[tuple[float, ...], dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """(budgets largest first, {layer: group levels}, [each budget's {norm buffer: value}]) of nested.safetensors."""
    if not path.is_file():
        raise DiscoError(f"{path.parent} has no {NESTED}: it was not trained with --nested")
    with safetensors.safe_open(str(path), framework="pt") as handle:
        budgets = tuple(json.loads(handle.metadata()["budgets"]))
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    levels = {name[len("levels/"):]: t for name, t in tensors.items() if name.startswith("levels/")}
    norms = [{name[len(f"norms/{k}/"):]: t for name, t in tensors.items() if name.startswith(f"norms/{k}/")}
             for k in range(len(budgets))]
    return budgets, levels, norms
