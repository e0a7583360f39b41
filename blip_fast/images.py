"""Reading images and BLIP's evaluation transform (PIL; the GPU pipeline comes with the data issue).

The evaluation transform of the original (``data/__init__.py``): resize to a square
``image_size`` with bicubic interpolation (no crop), scale to [0, 1], normalise with the CLIP
mean/std that BLIP uses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


class ImageError(ValueError):
    """An image file is missing, unreadable or corrupt."""


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB (grayscale, CMYK, palette and alpha images are converted)."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"cannot decode image {path}: {error}") from None


def eval_transform(image: Image.Image, image_size: int) -> torch.Tensor:
    """(3, image_size, image_size) float32 normalised pixels."""
    resized = image.convert("RGB").resize((image_size, image_size), Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return (pixels - mean) / std


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
    tensors = []
    for item in images:
        if isinstance(item, (str, Path)):
            item = load_image(item)
        if not isinstance(item, Image.Image):
            raise TypeError(f"expected an image path, a PIL image or a tensor; got {type(item).__name__}")
        tensors.append(eval_transform(item, image_size))
    return torch.stack(tensors)
