"""A rank's programs: one per budget its deployment carries (disco/export/budgets.py), all cut from one shard.

Level k's program runs level k's plans: every layer sends only the channels level k keeps, and the remote weight
columns of the channels it no longer receives are left out (a column subset of the largest budget's block, in the
same order: by source, then channel). Every other weight is the shard's own tensor, shared by all levels; only
BatchNorm's statistics are level k's (`disco.budget{k}.NAME`). BatchNorms are not folded into convs here: folding
would store every conv's weights once per budget. Rank 0 names the level of each batch in its status header
(disco/runtime/protocol.py), so every rank runs the same one.
"""
from __future__ import annotations

from pathlib import Path

import torch

from disco.errors import DiscoError
from disco.export.budgets import LEVEL_KEYS, level_prefix
from disco.export.manifest import Manifest
from disco.runtime.deployment_graph import DeploymentGraph
from disco.runtime.program import LocalProgram, load_shard
from disco.split.plan import WEIGHT_REMOTE


class Programs:
    """The programs by level; `default` is the level a batch runs at unless rank 0 names another."""

    def __init__(self, programs: list[LocalProgram], default: int = 0):
        if not 0 <= default < len(programs):
            raise DiscoError(f"no level {default}: the deployment carries {len(programs)}")
        self.programs, self.default = programs, default

    def at(self, level: int | None = None) -> LocalProgram:
        if level is None:
            return self.programs[self.default]
        if not 0 <= level < len(self.programs):
            raise DiscoError(f"rank 0 asked for budget level {level}; the deployment carries {len(self.programs)}")
        return self.programs[level]

    # --profile times the runs at the default level (the run's --budget)
    def start_profiling(self):
        return self.at().start_profiling()

    @property
    def profile(self):
        return self.at().profile


def as_programs(programs) -> Programs:
    """Programs as they are, or one LocalProgram as the only level."""
    return programs if isinstance(programs, Programs) else Programs([programs])


def level_tensors(tensors: dict[str, torch.Tensor], largest: dict, plans: dict, rank: int, level: int
                  ) -> dict[str, torch.Tensor]:
    """The shard's tensors as level `level`'s program reads them (see the module doc); no weight is copied but the
    remote blocks' kept columns."""
    prefix = level_prefix(level)
    chosen = {key: value for key, value in tensors.items() if not key.startswith(LEVEL_KEYS)}
    chosen.update({key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)})
    for name, plan in plans.items():
        key = f"{name}.{WEIGHT_REMOTE}"
        if level == 0 or plan.conv_groups > 1 or key not in chosen:
            continue  # a grouped conv zero-fills the channels it does not receive: its weight is unchanged
        kept = torch.isin(largest[name].received_channels(rank), plan.received_channels(rank))
        chosen[key] = chosen[key][:, kept.to(chosen[key].device)]
    return chosen


def build_programs(manifest: Manifest, tensors: dict[str, torch.Tensor], rank: int, device: torch.device,
                   model_code: str | Path | None = None, budget: float | None = None,
                   graph: DeploymentGraph | None = None) -> Programs:
    """Every level's program of the rank (one when the deployment carries one budget); `budget` sets the default
    level (None: the deployment's own default). `graph`: the deployment's graph, when already built (levels and the
    ranks of one process share it)."""
    nested = manifest.budgets()
    default = manifest.level_of(budget)
    graph = graph if graph is not None else DeploymentGraph(manifest, tensors, model_code)
    if nested is None:
        return Programs([LocalProgram(manifest, tensors, rank, device, model_code, graph=graph)], default)
    tensors = {key: value.to(device) for key, value in tensors.items()}  # once: the levels share them
    programs = []
    for level in range(len(nested.budgets)):
        plans = nested.plans_at(level, manifest.plans)
        programs.append(LocalProgram(manifest, level_tensors(tensors, manifest.plans, plans, rank, level), rank,
                                     device, model_code, plans=plans, fold=False, graph=graph))
    return Programs(programs, default)


def load_programs(manifest: Manifest, folder: Path, rank: int, device: torch.device,
                  model_code: str | Path | None = None, budget: float | None = None,
                  graph: DeploymentGraph | None = None) -> Programs:
    """Verify and load the rank's shard (before any communication), then build its programs."""
    return build_programs(manifest, load_shard(manifest, folder, rank), rank, device, model_code, budget, graph)
