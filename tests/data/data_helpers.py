"""Helpers shared by the data tests: photo-like test images, small annotation files and tars."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def photo_like(width: int = 96, height: int = 72, seed: int = 0) -> Image.Image:
    """An RGB image with what photos have and flat synthetic scenes lack: smooth shading, edges and noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([128 + 90 * np.sin(x / (7 + 5 * c) + y / (11 + 3 * c) + rng.uniform(0, 6)) for c in range(3)], -1)
    for _ in range(4):                                       # a few soft blobs with hard edges
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(5, width / 3)
        inside = (x - cx) ** 2 + (y - cy) ** 2 < r * r
        base[inside] = base[inside] * 0.4 + rng.uniform(0, 255, 3) * 0.6
    base += rng.normal(0, 12, base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def write_json(path: Path, entries) -> Path:
    path.write_text(json.dumps(entries))
    return path


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar with exactly these members, in this order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def keys(batch) -> list[str]:
    return [sample.key for sample in batch]


def run(loader, batches: int | None = None) -> list[list[str]]:
    """The keys of each batch of one pass (or of its first ``batches`` batches)."""
    out = []
    for batch in loader:
        out.append(keys(batch))
        if batches is not None and len(out) == batches:
            break
    return out
