"""One epoch of samples for one process: split across ranks and workers, shuffled with a seed, resumable.

A :class:`SampleStream` is an ``IterableDataset`` over a source -- an annotation list
(:mod:`blip_fast.data.annotations`, random access) or tar shards (:mod:`blip_fast.data.shards`,
read front to back). Each DataLoader worker of each rank reads its own part, its *role*:

* **annotation lists**: a permutation of all entries drawn from ``(seed, epoch)``, dealt to the
  ranks (``perm[rank::world_size]``) and then to the workers (``[role::num_workers]``);
* **shards**: the shard order is permuted with ``(seed, epoch)`` and dealt the same way; each
  role reads its shards in turn through a shuffle buffer (``shuffle_buffer`` samples; when full,
  a random slot is emitted and refilled) seeded with ``(seed, epoch, rank, role)``. With fewer
  shards than ranks x workers some roles get none (a warning says so).

Every entry or shard sample goes to exactly one role. A role's stream is a pure function of
``(seed, epoch, rank, world_size, role, num_workers)``, which is what makes resuming exact: a role
restarted at position ``p`` of its stream (annotation lists jump there; shards re-read, without
decoding, up to ``p``) yields exactly what the uninterrupted role yielded from ``p`` on.
:class:`blip_fast.data.loader.ResumableLoader` records those positions as batches are consumed.

After the position is taken, each record is checked by the source, its image read and decoded
(:mod:`blip_fast.data.decode`), and ``transform`` applied; a record that fails any of these with
:class:`~blip_fast.data.sample.BadSample` is skipped and counted in the role's ``DataStats``.
Checking after positioning means a bad record occupies a position like a good one, so skipping
never shifts a caption onto another image, and a resumed stream counts no skip twice.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .decode import decode_image, identify_image, read_image_file
from .sample import MISSING_IMAGE, BadSample, DataStats, Sample

log = logging.getLogger("blip_fast.data")

DECODE_MODES = ("pil", "bytes")


@dataclass
class Tagged:
    """A stream item as the resumable loader sees it: which role, where in its stream, its stats so far."""

    role: int
    position: int          # the role's stream position after this item
    stats: DataStats       # the role's live counters (copied when the batch is collated)
    item: object


@dataclass
class RoleEnd:
    """Last item of a role's stream (carries the final counters; the loader drops it from batches)."""

    role: int
    stats: DataStats


def buffer_shuffle(records, size: int, rng: random.Random) -> Iterator:
    """Shuffle a stream through a buffer of ``size`` records (webdataset's scheme); deterministic given ``rng``."""
    buffer = []
    for record in records:
        if len(buffer) < size:
            buffer.append(record)
            continue
        slot = rng.randrange(size)
        yield buffer[slot]
        buffer[slot] = record
    rng.shuffle(buffer)
    yield from buffer


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class SampleStream(IterableDataset):
    """Samples of ``source`` for this rank and DataLoader worker (see the module docstring).

    ``decode``: ``"pil"`` fills ``sample.image`` with the RGB image; ``"bytes"`` only reads the
    file into ``sample.image_bytes`` and checks its header (for decoders elsewhere, e.g. on the
    GPU). ``transform(sample)`` turns a checked sample into what the stream yields (it may raise
    ``BadSample`` to skip one). ``rank``/``world_size`` default to torch.distributed's.
    """

    def __init__(self, source, *, seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 1000,
                 rank: int | None = None, world_size: int | None = None, decode: str = "pil",
                 transform: Callable[[Sample], object] | None = None):
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be at least 1, got {shuffle_buffer}")
        default_rank, default_world = _distributed()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")
        self.source, self.seed, self.shuffle, self.shuffle_buffer = source, seed, shuffle, shuffle_buffer
        self.decode, self.transform = decode, transform
        self.sharded = hasattr(source, "shards")
        self.epoch = 0
        self.start: dict[int, int] = {}   # role -> position to resume at (-1: the role is done)
        self.role_offset = 0              # worker w plays role (w + role_offset) % num_workers
        self.tagged = False               # yield Tagged items and a RoleEnd (set by ResumableLoader)
        self.stats = DataStats()          # counters of the last iteration in this process
        self._logged: set[str] = set()

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (new permutation / shard order / buffer seed)."""
        self.epoch, self.start, self.role_offset = epoch, {}, 0

    def _roles(self) -> tuple[int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return (worker + self.role_offset) % workers, workers

    def role_records(self, role: int, num_roles: int):
        """The raw records of one role's stream in order: an array of entry indices, or an iterator of shard records."""
        if not self.sharded:
            n = len(self.source)
            order = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
            return order[self.rank::self.world_size][role::num_roles]
        shards = list(self.source.shards)
        if self.shuffle:
            shards = [shards[i] for i in np.random.default_rng([self.seed, self.epoch]).permutation(len(shards))]
        mine = shards[self.rank::self.world_size][role::num_roles]
        if not mine:
            log.warning("rank %d worker %d has no shard to read: %d shards for %d ranks x %d workers",
                        self.rank, role, len(shards), self.world_size, num_roles)
        records = chain.from_iterable(self.source.read(shard) for shard in mine)
        if self.shuffle and self.shuffle_buffer > 1:
            state = np.random.SeedSequence([self.seed, self.epoch, self.rank, role]).generate_state(2)
            records = buffer_shuffle(records, self.shuffle_buffer, random.Random(int(state[0]) << 32 | int(state[1])))
        return records

    def _prepare(self, record, stats: DataStats):
        sample = self.source.sample(record, stats)
        if sample.image_bytes is None:
            if sample.image_path is None:
                raise BadSample(MISSING_IMAGE, f"sample {sample.key} has no image")
            sample.image_bytes = read_image_file(sample.image_path)
        what = sample.image_path or f"{sample.extra.get('shard', '')}:{sample.key}"
        if self.decode == "pil":
            sample.image = decode_image(sample.image_bytes, stats, what=what)
        else:
            identify_image(sample.image_bytes, what=what)
        return self.transform(sample) if self.transform is not None else sample

    def __iter__(self):
        role, num_roles = self._roles()
        start = self.start.get(role, 0)
        stats = self.stats = DataStats()
        if start < 0:
            return
        records = self.role_records(role, num_roles)
        if isinstance(records, np.ndarray):     # annotation lists jump to the position
            positioned = enumerate(records[start:].tolist(), start)
        else:                                   # shards are re-read (not decoded) up to it
            positioned = ((position, record) for position, record in enumerate(records) if position >= start)
        for position, record in positioned:
            try:
                item = self._prepare(record, stats)
            except BadSample as error:
                stats.skip(error)
                if not self.tagged and error.reason not in self._logged:
                    self._logged.add(error.reason)
                    log.warning("skipping samples (%s), first: %s", error.reason, error.detail)
                continue
            stats.samples += 1
            yield Tagged(role, position + 1, stats, item) if self.tagged else item
        if self.tagged:
            yield RoleEnd(role, stats)
