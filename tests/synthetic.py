"""A small ImageFolder written to disk: each class is a bright block at its own place, plus noise."""
from pathlib import Path

import numpy as np
from PIL import Image


def make_image_folder(root: Path, classes: int = 3, per_class: int = 40, size: int = 16, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", per_class // 2)):
        for label in range(classes):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = rng.normal(60, 30, (size, size))
                row = (label * size // classes)
                image[row:row + size // classes, 2:size - 2] += 120
                Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), mode="L").save(folder / f"{i}.png")
    return root
