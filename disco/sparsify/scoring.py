"""What a cut ranks groups by (SparsifyOptions.method; the names are disco/sparsify/methods.py's METHODS): one
scorer per method, each gathering what it needs from every step's mask gradients and valuing the candidates at a
cut. A new method is one GroupScorer subclass and its line in SCORERS.

Checkpoints hold every method's state under fixed keys ("importance", "gate_scores", "generator"), whichever
method wrote them: the keys of older checkpoints, which must keep loading."""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from disco.errors import DiscoError
from disco.sparsify.candidates import Candidates
from disco.sparsify.methods import METHODS

KEPT_FIRST = 2.0  # added to the value of groups still kept: values lie in [0, 1], so every kept group ranks first


class GroupScorer(ABC):
    """Values communication groups for a cut. `kept_first`: groups still kept rank before every dropped one, so
    dropped groups only fill capacity the granularity of groups leaves over and masks otherwise only shrink."""

    kept_first = True

    @classmethod
    def for_groups(cls, costs: dict[str, torch.Tensor], generator: torch.Generator) -> GroupScorer:
        """A scorer for groups shaped as `costs` ({layer: [nodes, in_channels]}), drawing from `generator` if it
        draws at all."""
        return cls(costs)

    def gather(self, gradients: dict[str, torch.Tensor]) -> None:
        """One optimiser step's d loss / d mask per layer ([nodes, in_channels], finite, unscaled, averaged over
        data-parallel processes). Nothing by default."""

    @abstractmethod
    def score(self, candidates: Candidates) -> torch.Tensor:
        """[candidates] value of keeping each (higher first)."""

    def value(self, candidates: Candidates, was_kept: torch.Tensor) -> torch.Tensor:
        """The score, kept groups first where this method ranks them so (`was_kept`: bool per candidate)."""
        value = self.score(candidates)
        return torch.where(was_kept, value + KEPT_FIRST, value) if self.kept_first else value

    def after_cut(self) -> None:
        """A cut happened. Nothing by default."""

    def tables(self) -> dict[str, dict[str, torch.Tensor]]:
        """The per-group tables this scorer keeps, by checkpoint key (live: writing into them changes the scores)."""
        return {}

    def state_dict(self) -> dict:
        return {key: {name: t.cpu() for name, t in table.items()} for key, table in self.tables().items()}

    def load_state_dict(self, state: dict) -> None:
        for key, table in self.tables().items():
            for name, value in state.get(key, {}).items():
                table[name].copy_(value)


class ImportanceScorer(GroupScorer):
    """"learned" (DISCO, docs/method.md 4): the squared mask gradient summed since the last cut (what removing a
    group costs, either sign), per byte, normalised to [0, 1]."""

    def __init__(self, costs: dict[str, torch.Tensor]):
        self.importance = {name: torch.zeros_like(c) for name, c in costs.items()}

    def gather(self, gradients: dict[str, torch.Tensor]) -> None:
        for name, gradient in gradients.items():
            self.importance[name] += gradient.pow(2)

    def score(self, candidates: Candidates) -> torch.Tensor:
        value = candidates.take(self.importance) / candidates.prices
        return value / (value.max() + 1e-30)

    def after_cut(self) -> None:
        for importance in self.importance.values():
            importance.zero_()

    def tables(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"importance": self.importance}


class GateScorer(GroupScorer):
    """"gates": each group's gate score takes a plain gradient step with the mask's gradient as its own
    (straight-through: the forward pass uses the hard 0/1 mask), i.e. it sums -d loss / d mask over the whole
    phase: a kept group scores what dropping it would cost, a dropped one (its gradient taken at 0) what
    bringing it back would gain, and noise averages out instead of adding up. Scores carry across cuts, and each
    cut keeps the best per byte among all groups, kept or not: a group dropped earlier can come back."""

    kept_first = False

    def __init__(self, costs: dict[str, torch.Tensor]):
        self.gate_scores = {name: torch.zeros_like(c) for name, c in costs.items()}

    def gather(self, gradients: dict[str, torch.Tensor]) -> None:
        for name, gradient in gradients.items():
            self.gate_scores[name] -= gradient

    def score(self, candidates: Candidates) -> torch.Tensor:
        return candidates.take(self.gate_scores) / candidates.prices

    def tables(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"gate_scores": self.gate_scores}


class RandomScorer(GroupScorer):
    """"random", the baseline: random groups on the same schedule, drawn from the sparsifier's seeded generator
    (which the sparsifier saves with every checkpoint: it is all this scorer's state). It gathers nothing, so its
    checkpoints' importance table is zeros (the sums earlier versions kept there were never read)."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    @classmethod
    def for_groups(cls, costs: dict[str, torch.Tensor], generator: torch.Generator) -> GroupScorer:
        return cls(generator)

    def score(self, candidates: Candidates) -> torch.Tensor:
        return torch.rand(candidates.prices.shape, generator=self.generator)


SCORERS: dict[str, type[GroupScorer]] = {"learned": ImportanceScorer, "gates": GateScorer, "random": RandomScorer}


def make_scorer(method: str, costs: dict[str, torch.Tensor], generator: torch.Generator) -> GroupScorer:
    """The scorer of `method`, one of METHODS (SparsifyOptions checked it), for groups shaped as `costs`."""
    if method not in SCORERS:
        raise DiscoError(f"method {method!r} has no scorer; known: {', '.join(METHODS)}")
    return SCORERS[method].for_groups(costs, generator)


def unused_tables(scorer: GroupScorer, costs: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Fresh zero tables for the score keys the scorer does not keep (nothing reads them): every checkpoint holds
    both tables, as it always has (so one written by any method loads anywhere), and `Sparsifier.importance` and
    `gate_scores` answer under every method."""
    return {key: {name: torch.zeros_like(c) for name, c in costs.items()}
            for key in ("importance", "gate_scores") if key not in scorer.tables()}
