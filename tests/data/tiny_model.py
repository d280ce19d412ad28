"""A user's own model file, loaded by `disco inspect --model tests/data/tiny_model.py:make_model`."""
from torch import nn


def make_model(num_classes: int = 10, in_channels: int = 1):
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),
    )


def not_a_model():
    return 42
