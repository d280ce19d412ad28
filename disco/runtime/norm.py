"""LayerNorm over channels split across ranks: exchange two partial sums per position, then normalise
the local channels (docs/method.md 3). The sums travel as fp32 whatever the transport dtype."""
from __future__ import annotations

import torch
from torch import nn

from disco.runtime.comm import Comm


class NormStep:
    def __init__(self, name: str, module: nn.LayerNorm, channels: torch.Tensor, local: nn.Module, rank: int):
        holders = sorted(set(channels.tolist()))
        self.name, self.eps, self.total = name, module.eps, channels.numel()
        self.peers = [k for k in holders if k != rank] if rank in holders else []
        self.weight, self.bias = local.weight, local.bias

    def __call__(self, x: torch.Tensor, comm: Comm) -> torch.Tensor:
        partial = torch.stack([x.sum(-1), (x * x).sum(-1)], dim=-1).to(torch.float32)
        received = comm.exchange({peer: partial for peer in self.peers},
                                 {peer: (tuple(partial.shape), torch.float32) for peer in self.peers},
                                 category="norm", what=f"norm {self.name}").wait()
        sums = partial.double() + sum((r.double() for r in received.values()), torch.zeros_like(partial.double()))
        mean = sums[..., 0] / self.total
        variance = (sums[..., 1] / self.total - mean * mean).clamp_min(0)
        y = (x - mean[..., None].to(x.dtype)) * torch.rsqrt(variance[..., None] + self.eps).to(x.dtype)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y
