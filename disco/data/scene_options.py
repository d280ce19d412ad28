"""How Fashion-MNIST scenes are drawn (disco.data.scenes): kept apart from the scenes themselves so that
option defaults can be read (`disco train --help`) without importing torch."""
from __future__ import annotations

from dataclasses import dataclass

from disco.errors import DiscoError

ITEM_SIZE = 28  # Fashion-MNIST images are 28x28


@dataclass(frozen=True)
class SceneOptions:
    """How scenes are drawn: canvas side in pixels, item count range, and the seed all scenes derive from."""
    canvas: int = 96
    min_items: int = 2
    max_items: int = 4
    seed: int = 0

    def __post_init__(self):
        if self.canvas < ITEM_SIZE:
            raise DiscoError(f"SceneOptions.canvas={self.canvas} must be at least {ITEM_SIZE} (one item's side)")
        if not 1 <= self.min_items <= self.max_items:
            raise DiscoError(f"SceneOptions needs 1 <= min_items <= max_items, got min_items={self.min_items}, "
                             f"max_items={self.max_items}")
        if self.seed < 0:  # numpy's SeedSequence, which scenes draw from, takes non-negative seeds only
            raise DiscoError(f"SceneOptions.seed={self.seed} must be >= 0")
