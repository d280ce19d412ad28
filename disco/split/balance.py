"""Which node computes which output channels of each channel-mixing layer, so that every node's share of the work
follows its weight (docs/method.md 2, "Node weights").

Node k's weight w_k says how fast it is relative to the others; it should do w_k / sum(w) of the MACs. Layers
are split in whole units: a channel, an attention head's block of channels, or a conv group.

- Plain layers (every output reads every input): node k gets the contiguous block of units
  [ceil(U * W_k / W), ceil(U * W_{k+1} / W)) with W_k = w_0 + ... + w_{k-1}; equal weights give exactly the
  long-standing `balanced` split. Such a layer is off its share by less than one unit.
- Grouped convs whose groups read one channel each (depthwise) follow their input, as before: moving one would
  send its only input channel.
- Other grouped convs (e.g. groups=4 over 3 nodes) cannot be split evenly in one layer; which node takes the
  extra group is chosen so the MACs done so far, over all layers, stay as close as possible to each node's
  share, and each node takes the groups whose inputs it already holds where it can.
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch

from disco.split.assignment import majority_per_group


class Balancer:
    """Chooses output assignments layer after layer (in graph order) and remembers each node's MACs so far."""

    def __init__(self, nodes: int, weights: tuple[float, ...] | None = None):
        self.nodes = nodes
        self.shares = [Fraction(w) for w in (weights or (1,) * nodes)]
        self.load = [0] * nodes  # MACs per image each node computes in the layers chosen so far
        self.chosen: dict[str, torch.Tensor] = {}  # a module called twice keeps its first call's assignment

    def proportional(self, units: int) -> torch.Tensor:
        """Node of each of `units` units: contiguous blocks whose sizes follow the weights."""
        total = sum(self.shares)
        bounds, running = [], Fraction(0)
        for share in self.shares:
            bounds.append(math.ceil(units * running / total))
            running += share
        bounds.append(units)
        sizes = [bounds[k + 1] - bounds[k] for k in range(self.nodes)]
        return torch.repeat_interleave(torch.arange(self.nodes), torch.tensor(sizes, dtype=torch.long))

    def grouped(self, in_assign: torch.Tensor, groups: int, out_channels: int, macs_per_group: int) -> torch.Tensor:
        if in_assign.numel() == groups:  # one input channel per group: stay where the input is
            return majority_per_group(in_assign, groups, out_channels, self.nodes)
        counts = self._counts_keeping_totals_even(groups, macs_per_group)
        held = torch.stack([(in_assign.reshape(groups, -1) == k).sum(1) for k in range(self.nodes)], 1)  # [g, k]
        owners = [-1] * groups
        # strongest preferences first: a group goes where most of its inputs already are, while that node has room
        for g, k in sorted(((g, k) for g in range(groups) for k in range(self.nodes)),
                           key=lambda gk: (-int(held[gk]), gk[0], gk[1])):
            if owners[g] < 0 and counts[k] > 0:
                owners[g], counts[k] = k, counts[k] - 1
        return torch.tensor(owners, dtype=torch.long).repeat_interleave(out_channels // groups)

    def _counts_keeping_totals_even(self, groups: int, macs_per_group: int) -> list[int]:
        """How many groups each node takes: what brings every node's total MACs closest to its share."""
        total = sum(self.shares)
        after = sum(self.load) + groups * macs_per_group
        room = [max(Fraction(0), share / total * after - load) for share, load in zip(self.shares, self.load)]
        scale = Fraction(groups) / sum(room) if sum(room) else Fraction(0)
        quotas = [r * scale for r in room] if scale else [Fraction(groups) * s / total for s in self.shares]
        counts = [math.floor(q) for q in quotas]
        by_remainder = sorted(range(self.nodes), key=lambda k: (-(quotas[k] - counts[k]), k))
        for k in by_remainder[:groups - sum(counts)]:
            counts[k] += 1
        return counts

    def record(self, out_assign: torch.Tensor, macs_per_channel: int) -> None:
        for k, rows in enumerate(torch.bincount(out_assign, minlength=self.nodes).tolist()):
            self.load[k] += rows * macs_per_channel
