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


def make_swin(num_classes: int = 10, in_channels: int = 3):
    """torchvision's Swin at toy size: two stages (patch merging between them), shifted 4x4 windows, 2 and 4
    heads; at 36x36 input the 9x9 patch grid is padded to whole windows and patch merging pads 9x9 to 10x10."""
    from torchvision.models.swin_transformer import SwinTransformer
    model = SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                            num_classes=num_classes)
    if in_channels != 3:
        model.features[0][0] = nn.Conv2d(in_channels, 32, kernel_size=4, stride=4)
    return model
