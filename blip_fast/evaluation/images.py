"""The images of an evaluation split: decoded as in training, through the evaluation transform (bicubic resize, no
crop), an unreadable one an error (evaluation sets are small and fixed: a skipped image would change the number)."""

from __future__ import annotations

import torch

from ..data.decode import decode_image, read_image_file
from ..data.sample import BadSample
from ..data.transforms import TransformConfig, eval_transform


def evaluation_images(paths: list[str], image_size: int) -> torch.Tensor:
    """(N, 3, S, S) of ``paths``; a path given several times (VQA asks about five questions an image) is read once."""
    transform = TransformConfig.eval(image_size)
    images = {}
    for path in paths:
        if path not in images:
            try:
                image = decode_image(read_image_file(path), what=path)
            except BadSample as error:
                raise ValueError(f"evaluation image: {error}") from None
            images[path] = eval_transform(image, transform)
    return torch.stack([images[path] for path in paths])
