"""User models whose operations no layer-by-layer split follows: DISCO moves data (counted) or exchanges partial
results instead of refusing them. Factories take the data's channels and classes like any model file."""
import torch
from torch import nn


class Transposes(nn.Module):
    """A conv reading the rows of a transposed feature map as its channels."""

    def __init__(self, in_channels=3):
        super().__init__()
        self.a, self.b = nn.Conv2d(in_channels, 8, 1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.b(self.a(x).transpose(1, 2))


class ReducesChannels(nn.Module):
    """A mean over channels that live on different nodes."""

    def __init__(self, in_channels=3):
        super().__init__()
        self.a = nn.Conv2d(in_channels, 8, 1)

    def forward(self, x):
        y = self.a(x)
        return y * y.mean(1, keepdim=True)


class UnknownOp(nn.Module):
    """An operation DISCO has no rule for (a running maximum over channels)."""

    def __init__(self, in_channels=3):
        super().__init__()
        self.a = nn.Conv2d(in_channels, 8, 1)

    def forward(self, x):
        return torch.cummax(self.a(x), dim=1).values


def make_transposes(in_channels=3, **_):
    return Transposes(in_channels)


def make_reduces_channels(in_channels=3, **_):
    return ReducesChannels(in_channels)


def make_unknown_op(in_channels=3, **_):
    return UnknownOp(in_channels)
