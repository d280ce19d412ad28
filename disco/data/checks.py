"""The user's own data (--data) checked before training: every image file is decoded once, up front.

A corrupt, truncated or non-image file would otherwise stop training mid-epoch with a DataLoader traceback.
Every folder loader (disco.data.datasets, annotated, superres) hands its samples to `check_samples`, which
stops at the first bad one with a one-line DiscoError naming it, or, with skip_bad=True (--skip-bad-data),
leaves the bad ones out and prints one line saying how many. The decoded sizes come back with the samples,
so a loader can see mixed sizes without opening the files again (`two_sizes`).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Generic, Iterable, Mapping, Sequence, TypeVar

from PIL import Image, UnidentifiedImageError
from disco.progress import Progress

from disco.errors import DiscoError

SKIP_HINT = "pass --skip-bad-data to leave such files out"
PROGRESS_FROM_FILES = 200  # fewer are checked in a blink: a bar would only flash

Sample = TypeVar("Sample")


class BadFile(Exception):
    """A file of the user's data that cannot be used; `cause` says why (without the path)."""

    def __init__(self, path: Path, cause: str):
        super().__init__(f"{path}: {cause}")
        self.path, self.cause = Path(path), cause


@dataclass(frozen=True)
class ImageFile:
    """An image file that decoded completely: its (height, width) and PIL mode."""
    path: Path
    size: tuple[int, int]
    mode: str

    def __str__(self) -> str:
        return f"{self.path} ({self.size[1]}x{self.size[0]})"


def decode_image(path: Path) -> ImageFile:
    """Open and decode all of `path` (Image.open reads only the header: a truncated file fails at load());
    BadFile when it cannot be used."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise BadFile(path, "is empty (0 bytes)")
        with Image.open(path) as image:
            image.load()
            decoded = ImageFile(path, (image.height, image.width), image.mode)
    except BadFile:
        raise
    except Exception as error:  # a decoder meeting a broken file may raise anything: the file is the problem
        raise BadFile(path, _cause(error)) from error
    if min(decoded.size) < 1:
        raise BadFile(path, f"has no pixels ({decoded.size[1]}x{decoded.size[0]})")
    return decoded


def _cause(error: Exception) -> str:
    """Why a file failed to decode, without the path (PIL's and the OS's messages repeat it)."""
    if isinstance(error, UnidentifiedImageError):
        return "is not an image file PIL can read"
    if isinstance(error, OSError) and error.strerror:
        return f"cannot be read ({error.strerror})"
    return f"cannot be decoded ({error or type(error).__name__})"


@dataclass
class CheckedSplit(Generic[Sample]):
    """The usable samples of one split, in their given order, and each one's image as decoded."""
    samples: list[Sample] = field(default_factory=list)
    images: list[ImageFile] = field(default_factory=list)


def check_samples(splits: Mapping[str, Sequence[Sample]], check: Callable[[Sample], ImageFile], *,
                  skip_bad: bool, source: str) -> dict[str, CheckedSplit[Sample]]:
    """Run `check` (decodes a sample's files, returns its image; BadFile if one cannot be used) on every
    sample of every split of `source` (a --data folder). A bad sample raises a one-line DiscoError, or with
    `skip_bad` is left out; one line on stderr then says how many were. A split left with no sample is an error.
    """
    checked = {split: CheckedSplit() for split in splits}
    bad: list[BadFile] = []
    with _progress(sum(map(len, splits.values())), f"checking {source}") as bar:
        for split, samples in splits.items():
            for sample in samples:
                try:
                    image = check(sample)
                except BadFile as problem:
                    if not skip_bad:
                        raise DiscoError(f"{problem}; {SKIP_HINT}") from problem
                    bad.append(problem)
                else:
                    checked[split].samples.append(sample)
                    checked[split].images.append(image)
                bar.update()
    if bad:
        print(f"--skip-bad-data: left out {len(bad)} bad file(s) of {source}; the first: {bad[0]}", file=sys.stderr)
    for split, kept in checked.items():
        if splits[split] and not kept.samples:
            raise DiscoError(f"no usable {split} sample left in {source}: all {len(splits[split])} are bad "
                             f"(the first left out: {bad[0]})")
    return checked


def _progress(total: int, desc: str) -> Progress:
    """Progress (disco/progress.py) when there are many files, as disco.training.loops shows epochs."""
    return Progress(None, desc, total=total, unit="files", enabled=total >= PROGRESS_FROM_FILES)


def two_sizes(images: Iterable[ImageFile]) -> tuple[ImageFile, ImageFile] | None:
    """The first image and the first one of another size, or None when all share one size."""
    images = iter(images)
    first = next(images, None)
    other = next((image for image in images if image.size != first.size), None)
    return (first, other) if other else None
