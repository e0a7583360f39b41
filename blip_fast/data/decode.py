"""Turning a sample's bytes and strings into something a model can use, or a counted refusal.

Images are decoded with PIL and converted to RGB exactly as the original does
(``Image.open(path).convert('RGB')``: grayscale, CMYK, palette and alpha images all go through
``convert``; EXIF orientation is not applied, as in the original).

**What counts as a recoverable image.** PIL refuses a JPEG that ends early; with
``ImageFile.LOAD_TRUNCATED_IMAGES`` it appends an end marker and decodes whatever is there,
filling the missing part with made-up blocks -- a different picture under the same caption. We
accept a truncated JPEG only when nothing but its end marker (``FF D9``) is missing, and we check
that rather than assume it: :func:`blip_fast.data.jpeg.jpeg_scan_complete` walks the Huffman-coded
data and confirms that every MCU of the image is present (sequential JPEGs with one scan, what
cameras and libjpeg write by default). Such a file decodes to exactly the pixels of the complete
file. Everything else that fails to decode (cut inside the image data, a progressive JPEG cut
anywhere, a broken PNG, bytes that are not an image, an empty file) is ``corrupt_image``.

**What is too large**: an image whose header claims more than :data:`MAX_IMAGE_PIXELS` is
``image_too_large``, refused before any pixel is decoded (a PNG of a few kilobytes can claim
30000 x 30000 pixels, 2.7 GB decoded); an image file over
:data:`~blip_fast.data.sample.MAX_SAMPLE_BYTES` is ``sample_too_large``, refused before it is read.
Inference (:func:`blip_fast.images.load_image`) reads and decodes with these same functions.

**What counts as a usable caption**: a string that is still non-empty after BLIP's own cleaning
(``pre_caption``), since an empty string would otherwise be trained on as a caption. In a list
of captions the unusable entries are dropped (counted as ``fixed``); a sample left with none is
skipped. Numbers, ``None`` and other non-strings are never converted to text.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from ..text.clean import clean_caption, clean_question
from .jpeg import jpeg_scan_complete
from .sample import (
    CORRUPT_IMAGE,
    IMAGE_TOO_LARGE,
    MAX_SAMPLE_BYTES,
    MISSING_IMAGE,
    NO_ANSWER,
    NO_CAPTION,
    NO_QUESTION,
    SAMPLE_TOO_LARGE,
    BadSample,
    DataStats,
)

JPEG_END_MISSING = "jpeg_end_marker_missing"   # DataStats.fixed key of a recovered JPEG
CAPTIONS_DROPPED = "caption_entries_dropped"
ANSWERS_DROPPED = "answer_entries_dropped"

_SOI, _EOI = b"\xff\xd8", b"\xff\xd9"

# The most pixels (width x height, read from the header before decoding) an image may have. It is PIL's own default
# limit (1 GiB / 4 / 3: 256 MiB of decoded RGB, where PIL starts to warn), far above the photos of any camera a
# caption dataset holds, and about the most one DataLoader worker should hold at once. Ours rather than PIL's global
# Image.MAX_IMAGE_PIXELS, which other libraries change or disable, so that training and inference accept the same.
MAX_IMAGE_PIXELS = 89_478_485


def read_image_file(path: str | Path) -> bytes:
    """The bytes of an image file, or :class:`BadSample`.

    A path that is not a readable regular file is ``missing_image``, a file over ``MAX_SAMPLE_BYTES``
    ``sample_too_large`` (not read). The file is opened non-blocking and checked on its descriptor: opening a
    named pipe waits for a writer (forever), a device such as ``/dev/zero`` never ends, and neither is an image.
    The messages read as one sentence, for inference's errors too.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise BadSample(MISSING_IMAGE, f"image not found: {path}") from None
    except OSError as error:
        raise BadSample(MISSING_IMAGE, f"cannot read image {path}: {error.strerror or error}") from None
    except ValueError as error:  # a path no file can have (an embedded NUL)
        raise BadSample(MISSING_IMAGE, f"image not found: {path!r}: {error}") from None
    try:
        info = os.fstat(descriptor)
        if stat.S_ISDIR(info.st_mode):
            raise BadSample(MISSING_IMAGE, f"{path} is a directory, not an image file")
        if not stat.S_ISREG(info.st_mode):
            raise BadSample(MISSING_IMAGE, f"{path} is not a regular file (a named pipe, device or socket)")
        if info.st_size > MAX_SAMPLE_BYTES:
            raise BadSample(SAMPLE_TOO_LARGE, _too_many_bytes(path, info.st_size))
        with os.fdopen(descriptor, "rb", closefd=False) as file:
            data = file.read(MAX_SAMPLE_BYTES + 1)      # the file may have grown since fstat
    except OSError as error:
        raise BadSample(MISSING_IMAGE, f"cannot read image {path}: {error.strerror or error}") from None
    finally:
        os.close(descriptor)
    if len(data) > MAX_SAMPLE_BYTES:
        raise BadSample(SAMPLE_TOO_LARGE, _too_many_bytes(path, len(data)))
    return data


def _too_many_bytes(path, size: int) -> str:
    return f"image file {path} is {size} bytes, over the {MAX_SAMPLE_BYTES >> 20} MiB an image may have"


def _open(data: bytes, what: str, load: bool) -> Image.Image:
    """PIL's image of ``data`` (its pixels decoded when ``load``), or ``image_too_large`` before any decoding."""
    with warnings.catch_warnings():
        # PIL checks its own global limit as it opens a file: over it, a warning printed in the middle of the progress
        # bar (silenced: the check below is the one that decides); over twice it, an error (refused here too)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise BadSample(IMAGE_TOO_LARGE, f"{what} is too large: {width} x {height} pixels, more than the "
                                                 f"{MAX_IMAGE_PIXELS} an image may have")
            if load:
                image.load()
        except Image.DecompressionBombError as error:
            raise BadSample(IMAGE_TOO_LARGE, f"{what} is too large: {error}") from None
    return image


def recover_jpeg_missing_end(data: bytes) -> Image.Image | None:
    """The image of a JPEG that lacks only its end marker, or ``None`` (see the module docstring)."""
    if not data.startswith(_SOI) or data.endswith(_EOI):
        return None
    body = data.rstrip(b"\xff")                 # a cut between FF and D9 leaves a lone FF
    if not jpeg_scan_complete(body):
        return None
    try:
        return _open(body + _EOI, "image", load=True)
    except Exception:                           # complete data that still fails: not recoverable
        return None


def decode_image(data: bytes | None, stats: DataStats | None = None, what: str = "image") -> Image.Image:
    """Decode encoded image bytes to an RGB PIL image, or raise :class:`BadSample`.

    ``stats`` (optional) counts repairs and mode conversions under ``fixed``; ``what`` names the
    image in error messages.
    """
    stats = stats if stats is not None else DataStats()
    if not data:
        raise BadSample(CORRUPT_IMAGE, f"cannot decode {what}: empty image data")
    try:
        image = _open(data, what, load=True)
    except (BadSample, MemoryError):
        raise
    except Exception as error:  # PIL raises many types on hostile bytes; all mean "corrupt"
        image = recover_jpeg_missing_end(data)
        if image is None:
            raise BadSample(CORRUPT_IMAGE, f"cannot decode {what}: {type(error).__name__}: {error}") from None
        stats.fix(JPEG_END_MISSING)
    if image.mode != "RGB":
        stats.fix(f"converted_{image.mode}_to_RGB")
        image = _to_8_bits(image).convert("RGB")
    return image


def _to_8_bits(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grey images scaled to 8 bits (PIL's convert would clamp them to 0-255: a
    16-bit image nearly all white, a float one in [0, 1] all black); other modes as they are. Integer images are
    taken as 16-bit (PIL opens 16-bit PNGs as mode I), float ones in [0, 1] when no value exceeds 1."""
    if not image.mode.startswith(("I", "F")):
        return image
    values = np.asarray(image, dtype=np.float64)
    top = 1.0 if image.mode == "F" and values.size and np.nanmax(values) <= 1.0 else (
        255.0 if image.mode == "F" else 65535.0)
    scaled = np.nan_to_num(values / top * 255.0, nan=0.0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def identify_image(data: bytes | None, what: str = "image") -> str:
    """The format of encoded image bytes from their header alone (no decoding), or :class:`BadSample`.

    The cheap check for pipelines that decode elsewhere (the GPU): it catches empty data and
    bytes that are not an image, not a file cut short.
    """
    if not data:
        raise BadSample(CORRUPT_IMAGE, f"cannot decode {what}: empty image data")
    try:
        with _open(data, what, load=False) as image:
            return image.format
    except BadSample:
        raise
    except Exception as error:  # see decode_image
        raise BadSample(CORRUPT_IMAGE, f"cannot decode {what}: {type(error).__name__}: {error}") from None


def _usable_caption(text) -> bool:
    """Text with a letter or digit left after cleaning (punctuation alone, ``"???"``, says nothing of an image)."""
    return isinstance(text, str) and has_words(clean_caption(text))


def has_words(text: str) -> bool:
    return any(char.isalnum() for char in text)


def check_caption(caption, stats: DataStats | None = None, what: str = "sample") -> str | list[str]:
    """The usable part of a caption or list of captions (see the module docstring), or ``no_caption``."""
    if isinstance(caption, str):
        if _usable_caption(caption):
            return caption
        raise BadSample(NO_CAPTION, f"{what}: empty caption {caption!r}")
    if isinstance(caption, (list, tuple)):
        kept = [text for text in caption if _usable_caption(text)]
        if not kept:
            raise BadSample(NO_CAPTION, f"{what}: no usable caption in {list(caption)!r}"[:300])
        if stats is not None:
            stats.fix(CAPTIONS_DROPPED, len(caption) - len(kept))
        return kept
    raise BadSample(NO_CAPTION, f"{what}: caption is {type(caption).__name__}, not text")


def check_question(question, what: str = "sample") -> str:
    """A VQA question that is a string non-empty after BLIP's ``pre_question``, or ``no_question``."""
    if isinstance(question, str) and clean_question(question).strip():
        return question
    raise BadSample(NO_QUESTION, f"{what}: unusable question {question!r}"[:300])


def check_answers(answers, stats: DataStats | None = None, what: str = "sample") -> list[str]:
    """The non-empty string answers of a VQA training question (a single string is one answer), or ``no_answer``."""
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, (list, tuple)):
        raise BadSample(NO_ANSWER, f"{what}: answer is {type(answers).__name__}")
    kept = [a for a in answers if isinstance(a, str) and a.strip()]
    if not kept:
        raise BadSample(NO_ANSWER, f"{what}: no usable answer in {list(answers)!r}"[:300])
    if stats is not None:
        stats.fix(ANSWERS_DROPPED, len(answers) - len(kept))
    return kept
