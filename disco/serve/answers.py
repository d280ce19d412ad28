"""A request's image in, the task's answer out: images are read the way `disco run --input` reads them
(runtime.inputs.image_tensor: the model's channels, size and normalisation from the manifest), and answers are
the task's own (Task.answer), with masks and images sent as PNG."""
from __future__ import annotations

import base64
import contextlib
import io
import warnings
from typing import Iterator

import torch
from PIL import Image, UnidentifiedImageError

from disco.errors import DiscoError
from disco.export.manifest import Manifest
from disco.runtime.inputs import check_input, image_tensor
from disco.serve.batching import Refused
from disco.tasks.registry import get_task, resolved


@contextlib.contextmanager
def _opened(body: bytes, max_pixels: int) -> Iterator[Image.Image]:
    """The image in `body`, its header read and its size checked (nothing decoded yet), and a refusal for what
    cannot be read, whether here or while it is decoded."""
    if not body:
        raise Refused(400, "empty", "the request holds no image: send its bytes as the body, or as a file field "
                      "of a multipart form")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(body)) as image:
                width, height = image.size  # known before decoding: a huge image is refused unread
                if width * height > max_pixels:
                    raise Refused(413, "too_many_pixels", f"the image is {width}x{height} = {width * height:,} "
                                  f"pixels; at most {max_pixels:,} are accepted (--max-pixels)")
                yield image
    except Refused:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # more pixels than its header admits
        raise Refused(413, "too_many_pixels", f"the image decodes to more pixels than allowed (at most "
                      f"{max_pixels:,}, --max-pixels)") from None
    except UnidentifiedImageError as error:
        raise Refused(415, "not_an_image", f"the body is not an image PIL can read ({type(error).__name__}); "
                      "send PNG, JPEG, BMP, GIF, TIFF or WebP bytes") from None
    except (OSError, SyntaxError, ValueError) as error:  # truncated or corrupt data
        raise Refused(422, "unreadable_image", f"the image cannot be decoded: {error}") from None


def image_pixels(body: bytes, max_pixels: int) -> int:
    """The pixels the image in `body` says it has (its header alone; refused as read_image would refuse it)."""
    with _opened(body, max_pixels) as image:
        return image.size[0] * image.size[1]


def read_image(body: bytes, manifest: Manifest, max_pixels: int) -> tuple[torch.Tensor, dict]:
    """The model's input [C, H, W] from an encoded image, and what was done to it (for the answer)."""
    with _opened(body, max_pixels) as image:
        (width, height), mode = image.size, image.mode
        tensor = image_tensor(image, manifest)
    try:
        check_input(tensor[None], manifest)
    except DiscoError as error:
        raise Refused(422, "wrong_input", str(error)) from None
    read = {"size": [width, height], "mode": mode,
            "model_input": {"channels": tensor.shape[0], "size": [tensor.shape[2], tensor.shape[1]]}}
    return tensor, read


def _png(array: torch.Tensor) -> bytes:
    """[H, W] class indices (as a greyscale PNG of indices) or [C, H, W] in 0..1 (grey or RGB)."""
    if array.dim() == 2:
        image = Image.fromarray(array.to(torch.uint8).numpy(), mode="L")
    else:
        pixels = (array.clamp(0, 1) * 255).round().to(torch.uint8)
        image = Image.fromarray(pixels[0].numpy(), mode="L") if pixels.shape[0] == 1 else \
            Image.fromarray(pixels[:3].permute(1, 2, 0).contiguous().numpy(), mode="RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


PICTURE_KEYS = ("mask", "image")  # tensors an answer may hold, sent as PNG


def task_answers(leaves: list[torch.Tensor], top_k: int, *, manifest: Manifest, detector) -> list[dict]:
    """The task's answer for each image of a batch (leaves: the model's output tensors for these images)."""
    task = get_task(manifest.task)
    output = leaves[0] if len(leaves) == 1 else tuple(leaves)
    answer = task.answer or task.describe
    extra = {"top_k": top_k} if task.answer is not None else {}
    return answer(output, manifest.class_names, detector=detector, image_size=manifest.input_shape[1:], **extra)


def warm_up(manifest: Manifest) -> None:
    """Import the task's answer now (its module and what it imports), not in the first request."""
    task = get_task(manifest.task)
    resolved(task.answer or task.describe)


def as_json(answer: dict, read: dict, with_pictures: bool) -> dict:
    """JSON-ready: pictures as base64 PNG when asked for (?mask=true / ?image=true), else their size only."""
    result = {}
    for key, value in answer.items():
        if key in PICTURE_KEYS and isinstance(value, torch.Tensor):
            result[f"{key}_size"] = list(value.shape[-2:])
            if with_pictures:
                result[f"{key}_png"] = base64.b64encode(_png(value)).decode()
        else:
            result[key] = value
    return {**result, "input": read}


def as_png(answer: dict) -> bytes:
    """The answer's picture (segmentation mask or super-resolved image) as PNG bytes."""
    for key in PICTURE_KEYS:
        if isinstance(answer.get(key), torch.Tensor):
            return _png(answer[key])
    raise Refused(400, "no_picture", "this task's answer has no picture; ?format=png is for segmentation masks "
                  "and super-resolved images")
