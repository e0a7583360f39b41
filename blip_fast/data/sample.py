"""The record every data source yields, and the bookkeeping of samples that could not be used.

A :class:`Sample` is one image with its text: the image as encoded bytes (from a tar shard) or
as a file path (from an annotation list), a caption (or a list of them), and whatever else the
format carries (``extra``: image ids, VQA answers, the JSON of a webdataset sample). Decoding
fills ``image``.

Bad data never stops a run and is never silently used: a sample that cannot be used raises
:class:`BadSample` with one of the reasons below, the stream skips it and counts it in a
:class:`DataStats`. Data that is fixed instead (a list of captions that loses its empty entries,
a JPEG that lacks only its end marker, a CMYK image converted to RGB) is counted under ``fixed``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from PIL import Image

# Reasons for skipping a sample (keys of DataStats.skipped).
MISSING_IMAGE = "missing_image"      # no such file, or a shard sample without an image member
CORRUPT_IMAGE = "corrupt_image"      # not decodable (truncated inside the image data, not an image, empty)
IMAGE_TOO_LARGE = "image_too_large"  # more pixels than decode.MAX_IMAGE_PIXELS (seen in the header, never decoded)
SAMPLE_TOO_LARGE = "sample_too_large"  # an image file or a shard sample's members over MAX_SAMPLE_BYTES (never read)
NO_CAPTION = "no_caption"            # no caption that is a non-empty string after BLIP's cleaning
NO_QUESTION = "no_question"          # VQA: the question is missing, not a string or empty
NO_ANSWER = "no_answer"              # VQA training: no usable answer
BAD_RECORD = "bad_record"            # an annotation entry or shard member group of the wrong shape
BAD_SHARD = "bad_shard"              # a tar shard that is missing or breaks off; counts shards, not samples
REASONS = (MISSING_IMAGE, CORRUPT_IMAGE, IMAGE_TOO_LARGE, SAMPLE_TOO_LARGE, NO_CAPTION, NO_QUESTION, NO_ANSWER,
           BAD_RECORD, BAD_SHARD)

# The most bytes one sample may bring into memory: an image file, or all the members of one key in a shard. Files
# are read whole, so without a cap one member of zeros (800 MiB in a 3.6 MB .tar.gz) costs gigabytes of memory in
# every DataLoader worker. 64 MiB is far above any image of a caption dataset (a 100-megapixel JPEG is about
# 30 MB; img2dataset resizes to well under 1 MB) and any caption or JSON; bigger ones are skipped unread.
MAX_SAMPLE_BYTES = 64 << 20


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Sample:
    """One image and its text, as a source yields it.

    Exactly one of ``image_bytes`` (shards) and ``image_path`` (annotation lists) is normally set;
    a sample with neither is skipped as ``missing_image``. ``caption`` is a string, a list of
    strings (pretraining lists, retrieval evaluation) or ``None`` (VQA keeps its question and
    answers in ``extra``). ``image`` is the decoded RGB image, filled by the stream.
    """

    key: str
    image_bytes: bytes | None = None
    image_path: str | None = None
    caption: str | list[str] | None = None
    extra: dict = field(default_factory=dict)
    image: Image.Image | None = None


@dataclass
class DataStats:
    """Counts of what happened to the samples of a stream.

    ``samples``: yielded. ``skipped``: reason -> samples skipped (``bad_shard`` counts shards).
    ``fixed``: what -> count of repairs and conversions that kept a sample. ``first``: reason ->
    the first message seen, for the log. Every record a stream reads is either yielded or
    skipped, so ``samples + sum(skipped.values())`` is the number of records read (plus the bad
    shards).
    """

    samples: int = 0
    skipped: Counter = field(default_factory=Counter)
    fixed: Counter = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)

    def skip(self, error: BadSample) -> None:
        self.skipped[error.reason] += 1
        self.first.setdefault(error.reason, error.detail)

    def fix(self, what: str, count: int = 1) -> None:
        if count:
            self.fixed[what] += count

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def __add__(self, other: DataStats) -> DataStats:
        first = dict(other.first)
        first.update(self.first)
        return DataStats(self.samples + other.samples, self.skipped + other.skipped, self.fixed + other.fixed, first)

    def copy(self) -> DataStats:
        return DataStats(self.samples, Counter(self.skipped), Counter(self.fixed), dict(self.first))

    def to_dict(self) -> dict:
        return {"samples": self.samples, "skipped": dict(self.skipped), "fixed": dict(self.fixed),
                "first": dict(self.first)}

    @classmethod
    def from_dict(cls, state: dict) -> DataStats:
        return cls(int(state["samples"]), Counter(state["skipped"]), Counter(state["fixed"]), dict(state["first"]))

    def summary(self) -> str:
        """One line for the run's log: ``1000 samples; skipped 3 (corrupt_image 2, no_caption 1); fixed ...``."""
        line = f"{self.samples} samples; skipped {self.total_skipped}"
        if self.skipped:
            line += " (" + ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) + ")"
        if self.fixed:
            line += "; fixed " + ", ".join(f"{k} {v}" for k, v in sorted(self.fixed.items()))
        return line
