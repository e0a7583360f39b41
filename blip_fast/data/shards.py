"""Webdataset tar shards, as img2dataset writes them: reading them as a sample source, and writing them.

A shard is a plain tar file. The files of one sample sit next to each other and share a key:
``00000/000000012.jpg``, ``00000/000000012.txt``, ``00000/000000012.json``. The key is the
member path up to the first dot of its file name, the extension is the rest (lower-cased). The
image is the member with an image extension; the caption is the ``.txt`` member (UTF-8) or else
the ``"caption"`` field of the ``.json`` member, whose fields land in ``extra["meta"]``.

Shards are read with the standard library's ``tarfile`` in streaming mode (one forward pass;
gzip, bzip2 and xz shards are decompressed on the way), not with the ``webdataset`` package: the
splitting, shuffling and resuming that package offers cannot resume at an exact sample (see
:mod:`blip_fast.data.stream`), and the reading is a short loop over ``tarfile``. A shard that is
missing or breaks off (a truncated download) yields the samples before the break and then one
``bad_shard`` record; it never stops the run.

A sample's members are read into memory only up to ``MAX_SAMPLE_BYTES`` together (tar headers
give each member's size before its data): a sample whose members would pass it is skipped as
``sample_too_large`` and the rest of its data is passed over unread.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import io
import json
import lzma
import os
import re
import stat
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .decode import check_caption
from .sample import (
    BAD_RECORD,
    BAD_SHARD,
    MAX_SAMPLE_BYTES,
    MISSING_IMAGE,
    NO_CAPTION,
    SAMPLE_TOO_LARGE,
    BadSample,
    DataStats,
    Sample,
)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


@dataclass
class ShardRecord:
    """The members of one key in a shard, before they are checked."""

    key: str
    files: dict[str, bytes]
    shard: str
    problem: str | None = None     # set when the members do not form one sample (a repeated member)
    too_large: str | None = None   # set when the members are over MAX_SAMPLE_BYTES (``files`` then holds none)


@dataclass
class ShardFailure:
    """Stands in the stream where a shard could not be read (any further)."""

    shard: str
    detail: str


def split_name(name: str) -> tuple[str, str]:
    """``"00000/000000012.jpg"`` -> ``("00000/000000012", "jpg")`` (key up to the file name's first dot)."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower() if dot else ""


def expand_shards(spec) -> list[str]:
    """Shard paths from a list, a directory (its ``*.tar``), a glob, or a ``{000..009}`` brace range."""
    if isinstance(spec, (list, tuple)):
        return [path for item in spec for path in expand_shards(item)]
    spec = str(spec)
    if os.path.isdir(spec):
        return sorted(glob.glob(os.path.join(spec, "*.tar")))
    match = _BRACES.search(spec)
    if match:
        first, last = match.group(1), match.group(2)
        width = len(first) if first.startswith("0") else 0
        return [path for i in range(int(first), int(last) + 1)
                for path in expand_shards(spec[:match.start()] + str(i).zfill(width) + spec[match.end():])]
    if glob.has_magic(spec):
        return sorted(glob.glob(spec))
    return [spec]


class _TailReader:
    """A read-only stream that remembers how much it read and its last bytes (to check the archive's end)."""

    def __init__(self, fileobj, keep: int = 1 << 16):
        self.fileobj, self.keep, self.total, self.tail = fileobj, keep, 0, b""

    def read(self, size: int = -1) -> bytes:
        data = self.fileobj.read(size)
        self.total += len(data)
        self.tail = (self.tail + data)[-self.keep:]
        return data

    def block_at(self, offset: int) -> bytes:
        """The 512 bytes at ``offset`` (behind the read position or just ahead of it), or ``b""``."""
        if offset + 512 > self.total:
            self.read(offset + 512 - self.total)
        start = self.total - len(self.tail)
        return self.tail[offset - start:offset - start + 512] if offset >= start else b""


def _decompressed(raw):
    """``raw`` itself, or a decompressing reader for gzip, bzip2 and xz shards (which raise when cut short)."""
    head = raw.read(6)
    raw.seek(0)
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw)
    if head.startswith(b"BZh"):
        return bz2.BZ2File(raw)
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(raw)
    return raw


def read_shard(path: str) -> Iterator[ShardRecord | ShardFailure]:
    """The records of one shard, in file order; a :class:`ShardFailure` last if it cannot be read to the end.

    When a shard breaks off, the record being read at the break is dropped with it (its other
    members may be missing), so only records known to be whole are yielded.
    """
    key, files, problem, too_large, size = None, {}, None, None, 0
    try:
        with open(path, "rb", opener=_open_regular_file) as raw:
            stream = _TailReader(_decompressed(raw))
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    name_key, extension = split_name(member.name)
                    if name_key != key:                 # the previous key is whole: its members are adjacent
                        if key is not None:
                            yield ShardRecord(key, files, path, problem, too_large)
                        key, files, problem, too_large, size = name_key, {}, None, None, 0
                    if extension in files:
                        problem = f"more than one .{extension} member"
                    size += member.size
                    if too_large is None and size > MAX_SAMPLE_BYTES:
                        too_large = (f"{member.name} brings the sample to {size} bytes, over the "
                                     f"{MAX_SAMPLE_BYTES >> 20} MiB a sample may have")
                        files = {}
                    if too_large is None:               # else tarfile passes over the data unread
                        files[extension] = tar.extractfile(member).read()
                # tarfile ends its iteration without an error when a shard is cut at or inside a
                # member header: the missing end-of-archive (zero) block is what tells
                if stream.block_at(tar.offset) != bytes(512):
                    raise tarfile.ReadError("no end-of-archive block (cut short)")
    except (OSError, EOFError, tarfile.TarError, zlib.error, lzma.LZMAError) as error:
        yield ShardFailure(path, f"{path}: {type(error).__name__}: {error}")
        return
    if key is not None:
        yield ShardRecord(key, files, path, problem, too_large)


def _open_regular_file(path: str, flags: int) -> int:
    """``os.open`` that refuses what is not a regular file without waiting: opening a named pipe blocks until a
    writer comes (forever), and a device such as ``/dev/zero`` never ends."""
    descriptor = os.open(path, flags | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise OSError("not a regular file (a directory, named pipe, device or socket)")
    return descriptor


class TarShards:
    """A sample source over webdataset tar shards (``shards``: see :func:`expand_shards`)."""

    def __init__(self, shards):
        self.shards = expand_shards(shards)
        if not self.shards:
            raise ValueError(f"no shards found for {shards!r}")

    def read(self, shard: str) -> Iterator[ShardRecord | ShardFailure]:
        return read_shard(shard)

    def sample(self, record: ShardRecord | ShardFailure, stats: DataStats) -> Sample:
        """Check one record and turn it into a :class:`Sample` (image bytes, caption, ``extra["meta"]``)."""
        if isinstance(record, ShardFailure):
            raise BadSample(BAD_SHARD, record.detail)
        what = f"{record.shard}:{record.key}"
        files = record.files
        if record.too_large:
            raise BadSample(SAMPLE_TOO_LARGE, f"{what}: {record.too_large}")
        if record.problem:
            raise BadSample(BAD_RECORD, f"{what}: {record.problem}")
        images = [ext for ext in IMAGE_EXTENSIONS if ext in files]
        if not images:
            raise BadSample(MISSING_IMAGE, f"{what}: no image member (has {sorted(files)})")
        if len(images) > 1:
            raise BadSample(BAD_RECORD, f"{what}: several images ({', '.join(images)})")
        meta = {}
        if "json" in files:
            try:
                meta = json.loads(files["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise BadSample(BAD_RECORD, f"{what}: broken .json member: {error}") from None
            if not isinstance(meta, dict):
                raise BadSample(BAD_RECORD, f"{what}: .json member is not an object")
        if "txt" in files:
            try:
                caption = files["txt"].decode("utf-8")
            except UnicodeDecodeError:
                raise BadSample(NO_CAPTION, f"{what}: .txt member is not UTF-8") from None
        else:
            caption = meta.get("caption")
        caption = check_caption(caption, stats, what=what)
        extra = {"shard": record.shard, "meta": meta}
        others = {ext: data for ext, data in files.items() if ext not in (images[0], "txt", "json")}
        if others:
            extra["files"] = others
        return Sample(key=record.key, image_bytes=files[images[0]], caption=caption, extra=extra)


class ShardWriter:
    """Writes samples into numbered tar shards ``{directory}/{prefix}-{i:05d}.tar`` of ``max_count`` samples.

    Members get fixed metadata (mtime 0, uid/gid 0, mode 0644), so the same samples give the same
    bytes. A shard is written under a temporary name and renamed when complete.
    """

    def __init__(self, directory: str | Path, prefix: str, max_count: int = 1000):
        if max_count < 1:
            raise ValueError(f"max_count must be at least 1, got {max_count}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix, self.max_count = prefix, max_count
        self.paths: list[Path] = []
        self._tar, self._count = None, 0

    def write(self, key: str, files: dict[str, bytes]) -> None:
        """Add one sample: ``files`` maps extensions (``"jpg"``, ``"txt"``, ``"json"``) to bytes."""
        if not key or "." in key.rpartition("/")[2]:
            raise ValueError(f"shard key {key!r} must be non-empty with no dot in its file name")
        if self._tar is None or self._count >= self.max_count:
            self._open_next()
        for extension, data in files.items():
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1

    def _open_next(self) -> None:
        self._close_current()
        path = self.directory / f"{self.prefix}-{len(self.paths):05d}.tar"
        self.paths.append(path)
        self._tar = tarfile.open(path.with_suffix(".tar.tmp"), "w")
        self._count = 0

    def _close_current(self) -> None:
        if self._tar is not None:
            self._tar.close()
            os.replace(self.paths[-1].with_suffix(".tar.tmp"), self.paths[-1])
            self._tar = None

    def close(self) -> None:
        self._close_current()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
