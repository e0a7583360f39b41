"""The input of ``blip-fast capfilt``, cut into units of work: each input shard, or each fixed-size run of a JSON
list's entries.

A unit is what a rank does at once and what a rerun skips when its outputs are complete, so units are fixed by the
input alone (never by the number of ranks). Two inputs, as the rest of blip_fast reads them:

* **a BLIP JSON list** (one file or several, concatenated): ``[{"image": path, "caption": str | [str], ...}]``
  (:class:`~blip_fast.data.annotations.CaptionAnnotations`), image paths relative to ``image_root``; a unit is
  ``unit_size`` consecutive entries. Every caption of an entry is a web caption.
* **webdataset tar shards** (a directory, glob, ``{000..009}`` range or list; :mod:`blip_fast.data.shards`): a unit
  is one shard.

An image that cannot be used (missing, corrupt, too large, no usable caption, a shard cut short) is skipped and
counted by reason in the unit's :class:`~blip_fast.data.sample.DataStats`, as in training.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image

from ..data.annotations import CaptionAnnotations
from ..data.decode import decode_image, identify_image, read_image_file
from ..data.sample import BAD_RECORD, BadSample, DataStats
from ..data.shards import IMAGE_EXTENSIONS, TarShards, expand_shards

# PIL's format names -> the member extension the shard reader recognises
_FORMAT_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif",
                      "TIFF": "tiff"}


@dataclass
class ImageItem:
    """One usable input image with its web captions."""

    key: str
    """Unique within its unit; no dot in its last path part (a shard member's key)."""
    image_bytes: bytes
    extension: str
    """Of the image's bytes, one the shard reader recognises."""
    image: Image.Image
    """Decoded, RGB."""
    web_captions: list[str]
    fields: dict
    """What every output entry of this image copies: a JSON entry's fields but its caption; a shard sample's key and
    shard (its image path is added where the image is written)."""
    meta: dict
    """A shard sample's ``.json`` member (empty for JSON input), kept in the output sample's ``.json``."""


@dataclass(frozen=True)
class Unit:
    index: int
    name: str
    """What it covers: ``train.json[0:1000]`` or the shard's path."""
    start: int = 0
    stop: int = 0
    shard: str | None = None


class CapfiltInput:
    """The units of a JSON list or of tar shards, and the images of each."""

    def __init__(self, data: list[str], image_root: str | None = None, unit_size: int = 1000):
        if not data:
            raise ValueError("no --data given")
        # absolute paths: the units' names are part of the run's settings, which a rerun from elsewhere must match
        data = [os.path.abspath(path) for path in data]
        image_root = None if image_root is None else os.path.abspath(image_root)
        if unit_size < 1:
            raise ValueError(f"--unit-size must be at least 1; got {unit_size}")
        is_json = [str(path).endswith(".json") for path in data]
        if any(is_json) and not all(is_json):
            raise ValueError("--data takes JSON lists or tar shards, not both")
        self.kind = "json" if all(is_json) else "shards"
        self.annotations: CaptionAnnotations | None = None
        self.shards: TarShards | None = None
        if self.kind == "json":
            for path in data:
                if not Path(path).is_file():
                    raise FileNotFoundError(f"--data: annotation file not found: {path}")
            if image_root is not None and not Path(image_root).is_dir():
                raise FileNotFoundError(f"--image-root: not a directory: {image_root}")
            self.annotations = CaptionAnnotations(data, image_root)
            count = len(self.annotations)
            if count == 0:
                raise ValueError(f"--data {' '.join(data)}: no entries")
            label = data[0] if len(data) == 1 else f"{len(data)} JSON files"
            self.units = [Unit(u, f"{label}[{start}:{min(start + unit_size, count)}]", start,
                               min(start + unit_size, count))
                          for u, start in enumerate(range(0, count, unit_size))]
            self.width = max(6, len(str(count - 1)))
        else:
            if image_root is not None:
                raise ValueError("--image-root applies to a JSON list; shards hold their images")
            paths = expand_shards(data)
            missing = [path for path in paths if not os.path.isfile(path)]
            if not paths or missing:
                raise FileNotFoundError(f"--data: shard not found: {missing[0] if missing else data[0]}")
            self.shards = TarShards(paths)
            self.units = [Unit(u, path, shard=path) for u, path in enumerate(paths)]

    def items(self, unit: Unit, stats: DataStats) -> Iterator[ImageItem]:
        """The usable images of ``unit`` in input order; the others are counted in ``stats``."""
        if self.kind == "json":
            yield from self._json_items(unit, stats)
        else:
            yield from self._shard_items(unit, stats)

    def _json_items(self, unit: Unit, stats: DataStats) -> Iterator[ImageItem]:
        for index in range(unit.start, unit.stop):
            try:
                sample = self.annotations.sample(index, stats)
                data = read_image_file(sample.image_path)
                image = decode_image(data, stats, what=sample.image_path)
                extension = _extension(data, sample.image_path)
            except BadSample as error:
                stats.skip(error)
                continue
            if extension is None:  # a format the shard reader would not recognise: carried as PNG
                buffer = io.BytesIO()
                image.save(buffer, "PNG")
                data, extension = buffer.getvalue(), "png"
            entry = self.annotations.entries[index]
            captions = [sample.caption] if isinstance(sample.caption, str) else list(sample.caption)
            stats.samples += 1
            yield ImageItem(f"{index:0{self.width}d}", data, extension, image, captions,
                            {k: v for k, v in entry.items() if k != "caption"}, {})

    def _shard_items(self, unit: Unit, stats: DataStats) -> Iterator[ImageItem]:
        for record in self.shards.read(unit.shard):
            try:
                sample = self.shards.sample(record, stats)
                image = decode_image(sample.image_bytes, stats, what=f"{unit.shard}:{sample.key}")
            except BadSample as error:
                stats.skip(error)
                continue
            if not _safe_key(sample.key):  # a member name may hold "..": the key names output files
                stats.skip(BadSample(BAD_RECORD, f"{unit.shard}: key {sample.key!r} cannot name an output file"))
                continue
            # a ShardFailure raised BadSample above: this is a whole record, with one image member
            extension = next(ext for ext in IMAGE_EXTENSIONS if ext in record.files)
            stats.samples += 1
            yield ImageItem(sample.key, sample.image_bytes, extension, image, [sample.caption],
                            {"key": sample.key, "shard": unit.shard}, sample.extra.get("meta", {}))


def _safe_key(key: str) -> bool:
    path = PurePosixPath(key)
    return not path.is_absolute() and not {"..", "."} & set(path.parts) and "\\" not in key


def _extension(data: bytes, path: str) -> str | None:
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix in IMAGE_EXTENSIONS:
        return suffix
    return _FORMAT_EXTENSIONS.get(identify_image(data, what=path))
