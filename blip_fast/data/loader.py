"""A DataLoader over a :class:`~blip_fast.data.stream.SampleStream` that can save and restore its place.

    loader = ResumableLoader(SampleStream(source, seed=0), batch_size=64, num_workers=8, collate_fn=collate)
    loader.load_state_dict(checkpoint["data"])         # when resuming
    for epoch in range(loader.epoch, epochs):
        for batch in loader:                             # the rest of this epoch, then the loader moves on
            ...
            checkpoint["data"] = loader.state_dict()   # every batch handed out counts as consumed
    print(loader.stats.summary())

How a resume stays exact. Each worker of a DataLoader plays one *role*: it reads its own,
deterministic part of the epoch (see :mod:`blip_fast.data.stream`), and the DataLoader hands out
batches from the workers in turn, skipping a worker once it has run out. The state therefore
holds, besides the epoch and the number of samples this rank has handed out in it, the stream
position of every role after its last consumed batch and which role's batch comes next. A
resumed loader starts each role at its position and rotates the workers so that worker 0 plays
the role that was next; the batches that follow are exactly those the uninterrupted loader
would have given. This needs the same ranks, workers, batch size, seed and shuffling, which
``load_state_dict`` checks. Workers are not persistent: each pass starts them with the current
positions.

Counting. Each worker counts its skipped samples; every batch carries its worker's counts to the
main process, where ``stats`` adds them up (over all epochs) and logs each skip reason once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

from torch.utils.data import DataLoader

from .sample import DataStats
from .stream import RoleEnd, SampleStream, Tagged

log = logging.getLogger("blip_fast.data")

_MATCHING = ("roles", "batch_size", "rank", "world_size", "seed", "shuffle", "shuffle_buffer")


class TaggedBatch(NamedTuple):
    role: int
    position: int      # the role's stream position after this batch; -1 once the role is done
    count: int         # samples in the batch (0: only the role's final counts)
    stats: dict        # the role's counts so far (DataStats.to_dict)
    batch: object


class _Collate:
    """Runs in the worker: the user's collate on the samples, plus the role's position and counts."""

    def __init__(self, collate_fn: Callable):
        self.collate_fn = collate_fn

    def __call__(self, items: list) -> TaggedBatch:
        samples = [item.item for item in items if isinstance(item, Tagged)]
        last = items[-1]
        position = -1 if isinstance(last, RoleEnd) else last.position
        batch = self.collate_fn(samples) if samples else None
        return TaggedBatch(last.role, position, len(samples), last.stats.to_dict(), batch)


class ResumableLoader:
    """Batches of a :class:`SampleStream` with ``state_dict()`` / ``load_state_dict()`` (see the module docstring).

    ``collate_fn`` receives the list of items of one batch (default: the list itself).
    ``drop_last`` drops each worker's last, partial batch. The other arguments are the
    DataLoader's.
    """

    def __init__(self, stream: SampleStream, batch_size: int, *, num_workers: int = 0,
                 collate_fn: Callable | None = None, drop_last: bool = False, pin_memory: bool = False,
                 prefetch_factor: int | None = None, worker_init_fn: Callable | None = None,
                 multiprocessing_context=None, timeout: float = 0.0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be non-negative, got {num_workers}")
        self.stream, self.batch_size, self.num_workers = stream, batch_size, num_workers
        self.collate_fn = collate_fn if collate_fn is not None else list
        self.drop_last = drop_last
        self._loader_options = {"pin_memory": pin_memory, "worker_init_fn": worker_init_fn, "timeout": timeout,
                                "multiprocessing_context": multiprocessing_context}
        if num_workers > 0 and prefetch_factor is not None:
            self._loader_options["prefetch_factor"] = prefetch_factor
        stream.tagged = True
        self._epoch = stream.epoch
        self._positions: dict[int, int] = {}
        self._next_role = 0
        self._samples = 0
        self._base = DataStats()                # finished passes and restored state
        self._live: dict[int, DataStats] = {}   # role -> its counts in the current pass
        self._logged: set[str] = set()

    @property
    def roles(self) -> int:
        return max(1, self.num_workers)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def samples(self) -> int:
        """Samples handed out in the current epoch on this rank."""
        return self._samples

    @property
    def stats(self) -> DataStats:
        """Counts over every epoch so far (restored ones included)."""
        total = self._base
        for counts in self._live.values():
            total = total + counts
        return total

    def set_epoch(self, epoch: int) -> None:
        """Go to ``epoch``: from its beginning, unless it is the epoch the loader is in (then it continues)."""
        if epoch != self._epoch:
            self._fold()
            self._epoch, self._positions, self._next_role, self._samples = epoch, {}, 0, 0

    def _fold(self) -> None:
        self._base = self.stats
        self._live = {}

    def _log_new_skips(self, counts: DataStats) -> None:
        for reason in counts.skipped:
            if reason not in self._logged:
                self._logged.add(reason)
                log.warning("skipping samples (%s), first: %s -- counted in the loader's stats, logged once",
                            reason, counts.first.get(reason, ""))

    def __iter__(self):
        self._fold()
        self.stream.epoch = self._epoch
        self.stream.start = dict(self._positions)
        self.stream.role_offset = self._next_role
        loader = DataLoader(self.stream, batch_size=self.batch_size, num_workers=self.num_workers,
                            collate_fn=_Collate(self.collate_fn), drop_last=False, persistent_workers=False,
                            **self._loader_options)
        for tagged in loader:
            counts = DataStats.from_dict(tagged.stats)
            self._live[tagged.role] = counts
            self._positions[tagged.role] = tagged.position
            self._next_role = (tagged.role + 1) % self.roles
            self._log_new_skips(counts)
            if tagged.count == 0 or (self.drop_last and tagged.count < self.batch_size):
                continue
            self._samples += tagged.count
            yield tagged.batch
        self._fold()
        log.info("data epoch %d done: %s", self._epoch, self._base.summary())
        self._epoch, self._positions, self._next_role, self._samples = self._epoch + 1, {}, 0, 0

    def _settings(self) -> dict:
        s = self.stream
        return {"roles": self.roles, "batch_size": self.batch_size, "rank": s.rank, "world_size": s.world_size,
                "seed": s.seed, "shuffle": s.shuffle, "shuffle_buffer": s.shuffle_buffer}

    def state_dict(self) -> dict:
        """Where the loader is: epoch, samples handed out, each role's position, the next role, the counts."""
        return {"epoch": self._epoch, "samples": self._samples,
                "positions": [self._positions.get(role, 0) for role in range(self.roles)],
                "next_role": self._next_role, "stats": self.stats.to_dict(), **self._settings()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (from :meth:`state_dict` of a loader with the same settings)."""
        for name, value in self._settings().items():
            if state.get(name) != value:
                raise ValueError(f"cannot resume the data loader exactly: its state was saved with {name}="
                                 f"{state.get(name)!r}, this loader has {name}={value!r}")
        self._epoch, self._samples = int(state["epoch"]), int(state["samples"])
        self._next_role = int(state["next_role"])
        self._positions = {role: int(p) for role, p in enumerate(state["positions"]) if p}
        self._base, self._live = DataStats.from_dict(state["stats"]), {}
