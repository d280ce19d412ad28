"""Super-resolution pairs: high-resolution images and their bicubic downscales, plus the bicubic baseline and PSNR.

Sources: Fashion-MNIST (grey, 28x28 -> 14x14), the colour photographs shipped inside scikit-image's wheel
(no download), or any folder of PNG/JPEG images. Photos and folders are cut into non-overlapping square
patches. Images stay in [0, 1] (no normalisation), as PSNR with data_range=1 expects.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchmetrics.functional.image import peak_signal_noise_ratio

from disco.data.checks import check_samples, decode_image
from disco.data.datasets import DataRequest, DataSpec, fashion_mnist_splits, image_channels, rgb_image
from disco.errors import DiscoError

# Colour photographs whose files ship inside scikit-image's wheel (checked with 0.26: they load offline).
# The others in skimage.data need pooch and a download; "cat" is the same photograph as "chelsea".
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "colorwheel", "hubble_deep_field", "immunohistochemistry",
                  "retina", "rocket")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
USER_TRAIN_SHARE = 0.8  # a folder: the first 80% of files (sorted by path) train, the rest test


@dataclass(frozen=True)
class SuperResOptions:
    """Downscale factor and the side of the square high-resolution patches cut from photos and folders."""
    scale: int = 2
    patch: int = 96

    def __post_init__(self):
        if self.scale < 2:
            raise DiscoError(f"SuperResOptions.scale={self.scale} must be at least 2")
        if self.patch < self.scale or self.patch % self.scale:
            raise DiscoError(f"SuperResOptions.patch={self.patch} must be a positive multiple of scale={self.scale}")


class DownscaledPairs(Dataset):
    """Item i -> (lr [C, H/scale, W/scale], hr [C, H, W]), both float in [0, 1]; lr = bicubic_downscale(hr).

    `images` [N, C, H, W]: float in [0, 1], or uint8 in 0..255 (kept as uint8 and scaled per item: a quarter
    of the memory for large sets).
    """

    def __init__(self, images: torch.Tensor, scale: int = 2):
        if images.dim() != 4:
            raise DiscoError(f"DownscaledPairs expects images [N, C, H, W], got shape {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if scale < 1 or height % scale or width % scale:
            raise DiscoError(f"image size {height}x{width} is not divisible by scale {scale}: crop the images "
                             "to a multiple of the scale")
        if images.dtype != torch.uint8 and len(images) and not (images.min() >= 0 and images.max() <= 1):
            raise DiscoError("DownscaledPairs expects float images in [0, 1] (or uint8 in 0..255)")
        self.images, self.scale = images, scale

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        hr = self.images[index]
        hr = hr.float() / 255.0 if hr.dtype == torch.uint8 else hr
        return bicubic_downscale(hr, self.scale), hr


def bicubic_downscale(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """[C, H, W] or [N, C, H, W] -> 1/scale the size: antialiased bicubic (like PIL / MATLAB imresize), in [0, 1]."""
    batch = hr.unsqueeze(0) if hr.dim() == 3 else hr
    lr = F.interpolate(batch, scale_factor=1 / scale, mode="bicubic", antialias=True, align_corners=False)
    return lr.clamp(0, 1).reshape(*hr.shape[:-2], *lr.shape[-2:])


def bicubic_upscale(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """The baseline every super-resolution model must beat: bicubic upscale by `scale`, clamped to [0, 1]."""
    batch = lr.unsqueeze(0) if lr.dim() == 3 else lr
    sr = F.interpolate(batch, scale_factor=scale, mode="bicubic", align_corners=False)
    return sr.clamp(0, 1).reshape(*lr.shape[:-2], *sr.shape[-2:])


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images in [0, 1]; for a batch [N, C, H, W], the mean of the per-image PSNRs."""
    if pred.shape != target.shape:
        raise DiscoError(f"psnr needs equal shapes, got {tuple(pred.shape)} and {tuple(target.shape)}")
    dim = (1, 2, 3) if pred.dim() == 4 else None  # per image, as super-resolution papers report it
    return peak_signal_noise_ratio(pred.float(), target.float(), data_range=1.0, dim=dim)


def patches(image: torch.Tensor, size: int) -> torch.Tensor:
    """Non-overlapping size x size patches of one image [C, H, W] -> [M, C, size, size] (edges that do not fill
    a whole patch are dropped; M = 0 for an image smaller than a patch)."""
    channels = image.shape[0]
    rows, cols = image.shape[1] // size, image.shape[2] // size
    grid = image[:, :rows * size, :cols * size].reshape(channels, rows, size, cols, size)
    return grid.permute(1, 3, 0, 2, 4).reshape(rows * cols, channels, size, size)


def patch_stack(images: list[torch.Tensor], size: int, source: str) -> torch.Tensor:
    """Patches of all `images` (each [C, H, W]) in one tensor; a clear error when none is big enough."""
    cut = [patches(image, size) for image in images]
    if not cut or not sum(len(c) for c in cut):
        raise DiscoError(f"no {size}x{size} patch fits in the images of {source}: they must be at least "
                         f"{size}x{size} pixels")
    return torch.cat(cut)


def skimage_photos(names: tuple[str, ...] = SKIMAGE_PHOTOS) -> list[torch.Tensor]:
    """scikit-image's sample photographs as uint8 [3, H, W] tensors (read from the installed wheel, no network)."""
    import skimage.data  # imported here: only the photo source needs scikit-image

    photos = []
    for name in names:
        try:
            array = getattr(skimage.data, name)()
        except (AttributeError, ImportError, OSError) as error:  # ImportError: pooch, for photos not in the wheel
            raise DiscoError(f"scikit-image photo {name!r} is not available offline ({error}); use one of "
                             f"{', '.join(SKIMAGE_PHOTOS)}") from error
        photos.append(torch.from_numpy(np.ascontiguousarray(array[..., :3])).permute(2, 0, 1).contiguous())
    return photos


def image_files(folder: Path) -> list[Path]:
    """Every PNG/JPEG under `folder` (recursively), sorted by path so that splits are reproducible."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DiscoError(f"{folder} is not a folder: super-resolution --data expects a folder of PNG/JPEG images")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DiscoError(f"no PNG/JPEG images found under {folder}")
    return files


def read_images(files: list[Path]) -> list[torch.Tensor]:
    """uint8 [C, H, W] tensors: C = 1 when every file is greyscale, else 3 (grey files repeated to RGB)."""
    with_modes = []
    for path in files:
        with Image.open(path) as image:
            with_modes.append((image_channels(image) == 1, np.asarray(rgb_image(image))))
    all_grey = all(grey for grey, _ in with_modes)
    arrays = [array[..., :1] if all_grey else array for _, array in with_modes]
    return [torch.from_numpy(np.array(a)).permute(2, 0, 1).contiguous() for a in arrays]  # a writable copy


def photo_pairs(photos: list[torch.Tensor], options: SuperResOptions, source: str) -> DownscaledPairs:
    """(lr, hr) pairs from the non-overlapping options.patch-sized patches of `photos` (uint8 [C, H, W])."""
    return DownscaledPairs(patch_stack(photos, options.patch, source), options.scale)


# --- the superres task's data: scale 2, classes = 0, images in [0, 1] (mean 0, std 1) -----------------------
def superres_spec(name: str, train: DownscaledPairs, test: DownscaledPairs) -> DataSpec:
    channels, height, width = train.images.shape[1:]
    return DataSpec(name, train, test, channels=channels, classes=0, image_size=(height, width), class_names=[],
                    mean=[0.0] * channels, std=[1.0] * channels)


def fashion_mnist_pairs(request: DataRequest) -> DataSpec:
    """"fashion-mnist": 28x28 -> 14x14; train pairs from the train split, test pairs from the test split."""
    scale = SuperResOptions().scale
    train, test = (DownscaledPairs(split.data.unsqueeze(1), scale) for split in fashion_mnist_splits(request.cache))
    return superres_spec("fashion-mnist", train, test)


def skimage_pairs(request: DataRequest) -> DataSpec:
    """"photos": 96x96 patches of scikit-image's colour photographs, every other photo for training and the
    rest for testing, so no test patch comes from a training photo."""
    photos, options = skimage_photos(), SuperResOptions()
    return superres_spec("photos", photo_pairs(photos[::2], options, "scikit-image's training photos"),
                         photo_pairs(photos[1::2], options, "scikit-image's test photos"))


def folder_pairs(path: Path, request: DataRequest) -> DataSpec:
    """`data=PATH`: 96x96 patches of every PNG/JPEG under PATH; the first 80% of files by sorted path train,
    the rest test. Every file is decoded first (disco.data.checks): a bad one is an error, or left out with
    request.skip_bad_data (before the cut, so that the split is that of the usable files)."""
    files = check_samples({"images": image_files(path)}, decode_image, skip_bad=request.skip_bad_data,
                          source=str(path))["images"].samples
    if len(files) < 2:
        raise DiscoError(f"{path} has {len(files)} image: super-resolution needs at least 2 (train and test)")
    cut = min(len(files) - 1, max(1, int(len(files) * USER_TRAIN_SHARE)))
    images, options = read_images(files), SuperResOptions()  # read together: one channel count for both splits
    train = photo_pairs(images[:cut], options, f"{path} (training files)")
    test = photo_pairs(images[cut:], options, f"{path} (test files)")
    return superres_spec(Path(path).name, train, test)
