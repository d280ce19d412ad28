"""The groups a cut chooses among: every layer's existing groups flattened into one vector, in layer order, with
their prices and values; and the way back from a keep vector to each layer's mask."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Candidates:
    """names: the layers, in order. existing: per layer, [nodes, in_channels] bool: which groups are candidates
    (they cost bytes and, with nested budgets, the last recorded budget kept them); the flattened vectors list
    exactly these groups, layer after layer. prices: [candidates] bytes (seconds with a latency budget) each.
    value: [candidates] what keeping each is worth (higher first), or None until a scorer has valued them."""

    names: tuple[str, ...]
    existing: tuple[torch.Tensor, ...]
    prices: torch.Tensor
    value: torch.Tensor | None = None

    def take(self, per_layer: dict[str, torch.Tensor]) -> torch.Tensor:
        """The candidates' entries of per-layer [nodes, in_channels] tensors, as one vector on the CPU."""
        return _take(self.names, self.existing, per_layer)

    def valued(self, value: torch.Tensor) -> Candidates:
        return replace(self, value=value)

    def masks(self, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        """{layer: [nodes, in_channels] bool mask} keeping the candidates `keep` (a bool per candidate) marks; groups
        that are no candidates are dropped."""
        masks, offset = {}, 0
        for name, existing in zip(self.names, self.existing):
            count = int(existing.sum())
            mask = torch.zeros_like(existing)
            mask[existing] = keep[offset:offset + count].to(existing.device)
            masks[name] = mask
            offset += count
        return masks


def _take(names, existing, per_layer: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([per_layer[name][mask] for name, mask in zip(names, existing)]).cpu()


def candidate_groups(names, costs: dict[str, torch.Tensor], prices: dict[str, torch.Tensor],
                     allowed: dict[str, torch.Tensor] | None) -> Candidates:
    """The groups of the layers `names` that cost bytes (and, where `allowed` is given, that it allows: nested
    budgets keep only groups the last recorded budget kept), priced, not yet valued."""
    names = tuple(names)
    existing = tuple((costs[name] > 0) & (allowed[name] if allowed is not None else True) for name in names)
    return Candidates(names, existing, _take(names, existing, prices))
