"""Reading images for inference and batching them with BLIP's evaluation transform.

An image file is read and decoded by the training pipeline's own functions
(:func:`blip_fast.data.decode.read_image_file` and :func:`~blip_fast.data.decode.decode_image`), so
that a model sees at inference exactly the pixels it was trained on: the same recovery of a JPEG
missing only its end marker, the same scaling of 16-bit and float grey images, the same pixel and
file-size caps. What training skips and counts, inference refuses with an :class:`ImageError`.

:func:`to_batch` applies the evaluation transform of the original (``data/__init__.py``), the one the data
pipeline uses (:func:`blip_fast.data.transforms.eval_transform`): resize to a square ``image_size`` with bicubic
interpolation (no crop), scale to [0, 1], normalise with the CLIP mean/std that BLIP uses.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from PIL import Image

from .data.decode import decode_image, read_image_file
from .data.sample import BadSample
from .data.transforms import TransformConfig, eval_transform

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")     # a URI scheme and "//": https://, s3://, file://


class ImageError(ValueError):
    """An image is not a local image file, or is missing, unreadable, corrupt or too large."""


def load_image(path: str | Path) -> Image.Image:
    """An image file as RGB, decoded as training decodes it (see the module docstring), or :class:`ImageError`."""
    name = os.fspath(path)      # the string as given: Path would turn "https://x/y.jpg" into "https:/x/y.jpg"
    if isinstance(name, str) and _URL.match(name):
        raise ImageError(f"{name}: blip-fast reads local files only; download the image first")
    try:
        return decode_image(read_image_file(name), what=f"image {name}")
    except BadSample as error:
        raise ImageError(error.detail) from None


def to_batch(images, image_size: int) -> torch.Tensor:
    """A (B, 3, S, S) batch from paths, PIL images, or an already normalised tensor batch."""
    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            images = images[None]
        return images
    if isinstance(images, (str, Path, Image.Image)):
        images = [images]
    images = list(images)
    if not images:
        raise ValueError("no images given")
    transform = TransformConfig.eval(image_size)
    tensors = []
    for item in images:
        if isinstance(item, (str, Path)):
            item = load_image(item)
        if not isinstance(item, Image.Image):
            raise TypeError(f"expected an image path, a PIL image or a tensor; got {type(item).__name__}")
        tensors.append(eval_transform(item, transform))
    return torch.stack(tensors)
