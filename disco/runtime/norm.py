"""Norms and reductions over elements that span ranks (docs/method.md 3): each rank reduces its own part, the
partial results cross the network (always fp32: they need the precision), and each rank combines them.

- LayerNorm over dims split across ranks: (sum x, sum x^2) per position between the ranks holding them; each
  rank then normalises its own elements.
- GroupNorm with groups whose channels span ranks: (sum x, sum x^2) per such group between the ranks holding it.
- A sum, mean, max, min, product or variance over dims split across ranks: every rank holding part of them sends
  its partial result to every other rank, and the result is then the same on all (replicated).
"""
from __future__ import annotations

import torch

from disco.runtime.comm import Comm

STATISTIC = torch.float32


def _exchange(comm: Comm, sends: dict[int, torch.Tensor], receives: dict[int, tuple], what: str) -> dict:
    return comm.exchange(sends, receives, category="norm", what=what).wait()


def _normalise(x, mean, variance, eps, weight, bias):
    y = (x - mean.to(x.dtype)) * torch.rsqrt(variance + eps).to(x.dtype)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


class LayerNormStep:
    """LayerNorm over the last `dims` dims, some of which are split: partial sums with the other holders."""

    def __init__(self, name: str, holders: list[int], rank: int, dims: int, total: int, eps: float, stats: bool):
        self.name, self.dims, self.total, self.eps, self.stats = name, dims, total, eps, stats
        # a rank holding none of the normalised values has no part in the sums (its result is empty)
        self.peers = [k for k in holders if k != rank] if rank in holders else []

    def __call__(self, comm: Comm, x: torch.Tensor, weight=None, bias=None):
        reduced = tuple(range(x.dim() - self.dims, x.dim()))
        partial = torch.stack([x.sum(reduced), (x * x).sum(reduced)], dim=-1).to(STATISTIC)
        received = _exchange(comm, {p: partial for p in self.peers},
                             {p: (tuple(partial.shape), STATISTIC) for p in self.peers}, f"norm {self.name}")
        sums = partial.double() + sum((r.double() for r in received.values()), torch.zeros_like(partial.double()))
        mean = sums[..., 0] / self.total
        variance = (sums[..., 1] / self.total - mean * mean).clamp_min(0)
        shape = (*mean.shape, *([1] * self.dims))
        y = _normalise(x, mean.reshape(shape), variance.reshape(shape), self.eps, weight, bias)
        if not self.stats:
            return y
        return y, mean.reshape(shape).to(x.dtype), torch.rsqrt(variance + self.eps).reshape(shape).to(x.dtype)


class GroupNormStep:
    """GroupNorm whose groups' channels may span ranks: partial sums per shared group with each peer."""

    def __init__(self, name: str, channels: torch.Tensor, rank: int, groups: int, eps: float, spatial: int,
                 native: bool):
        self.name, self.groups, self.eps, self.native = name, groups, eps, native
        per_group = channels.numel() // groups
        held = (channels == rank) | (channels < 0)
        self.group_of = (held.nonzero().flatten() // per_group)  # group of each held channel, in order
        by_group = channels.reshape(groups, per_group)
        self.count = per_group * spatial
        self.shared = {}
        for peer in range(int(channels.max()) + 1):
            if peer == rank:
                continue
            both = ((by_group == rank).any(1) & (by_group == peer).any(1) & (by_group.amin(1) != by_group.amax(1)))
            if bool(both.any()):
                self.shared[peer] = both.nonzero().flatten()

    def to(self, device):
        self.group_of = self.group_of.to(device)
        self.shared = {k: v.to(device) for k, v in self.shared.items()}
        return self

    def __call__(self, comm: Comm, x: torch.Tensor, weight=None, bias=None):
        batch = x.shape[0]
        per_channel = torch.stack([x.reshape(batch, x.shape[1], -1).sum(-1),
                                   (x * x).reshape(batch, x.shape[1], -1).sum(-1)], dim=-1).to(STATISTIC)
        partial = torch.zeros(batch, self.groups, 2, dtype=STATISTIC, device=x.device)
        partial.index_add_(1, self.group_of, per_channel)
        received = _exchange(comm, {p: partial[:, groups] for p, groups in self.shared.items()},
                             {p: ((batch, groups.numel(), 2), STATISTIC) for p, groups in self.shared.items()},
                             f"group norm {self.name}")
        sums = partial.double()
        for peer, values in received.items():
            sums[:, self.shared[peer]] += values.double()
        mean = sums[..., 0] / self.count
        variance = (sums[..., 1] / self.count - mean * mean).clamp_min(0)
        view = (batch, -1, *([1] * (x.dim() - 2)))
        y = _normalise(x, mean[:, self.group_of].reshape(view), variance[:, self.group_of].reshape(view), self.eps,
                       None if weight is None else weight.reshape(1, -1, *([1] * (x.dim() - 2))),
                       None if bias is None else bias.reshape(1, -1, *([1] * (x.dim() - 2))))
        if not self.native:
            return y
        return y, mean.to(x.dtype), torch.rsqrt(variance + self.eps).to(x.dtype)


class ReduceStep:
    """A reduction over dims whose elements span ranks: partial results to every other rank, then combined.
    `kept_shape(batch)` / `out_shape(batch)`: the whole value reduced with its dims kept / the result's shape."""

    def __init__(self, name: str, kind: str, holders: list[int], rank: int, nodes: int, dims: list[int],
                 kept_shape, out_shape, total: int, correction: float):
        self.name, self.kind, self.dims = name, kind, tuple(dims)
        self.kept_shape, self.out_shape, self.total, self.correction = kept_shape, out_shape, total, correction
        self.holds = rank in holders
        self.senders = [k for k in holders if k != rank]
        self.receivers = [k for k in range(nodes) if k != rank] if self.holds else []

    def _partial(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(STATISTIC)
        if self.kind in ("sum", "mean"):
            return x.sum(self.dims, keepdim=True)[None]
        if self.kind == "var":
            return torch.stack([x.sum(self.dims, keepdim=True), (x * x).sum(self.dims, keepdim=True)])
        if self.kind == "prod":
            for dim in sorted(self.dims, reverse=True):
                x = x.prod(dim, keepdim=True)
            return x[None]
        return (torch.amax if self.kind == "max" else torch.amin)(x, self.dims, keepdim=True)[None]

    def __call__(self, comm: Comm, x: torch.Tensor, batch: int, dtype: torch.dtype):
        shape = (2 if self.kind == "var" else 1, *self.kept_shape(batch))
        mine = self._partial(x) if self.holds else None
        received = _exchange(comm, {k: mine for k in self.receivers},
                             {k: (shape, STATISTIC) for k in self.senders}, f"reduction {self.name}")
        stacked = torch.stack(([mine] if mine is not None else []) + [received[k] for k in self.senders])
        if self.kind in ("sum", "mean", "var"):
            combined = stacked.double().sum(0)
        elif self.kind == "prod":
            combined = stacked.prod(0)
        else:
            combined = stacked.amax(0) if self.kind == "max" else stacked.amin(0)
        if self.kind == "mean":
            combined = combined / self.total
        if self.kind == "var":
            mean = combined[0] / self.total
            combined = ((combined[1] - combined[0] * mean) / max(self.total - self.correction, 1))[None]
        return combined[0].reshape(self.out_shape(batch)).to(dtype)
