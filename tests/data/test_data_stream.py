"""Splitting by rank and worker covers every sample once; shuffling is seeded, per epoch, and a permutation."""

import logging
import random
from collections import Counter

import pytest
from data_helpers import run

from blip_fast.data.annotations import CaptionAnnotations
from blip_fast.data.loader import ResumableLoader
from blip_fast.data.shards import ShardRecord, TarShards
from blip_fast.data.stream import SampleStream, buffer_shuffle


@pytest.fixture(scope="module")
def sources(synth):
    return {"json": CaptionAnnotations(synth / "train.json", synth),
            "tar": TarShards(str(synth / "shards" / "train-*.tar"))}


def role_keys(stream: SampleStream, role: int, roles: int) -> list[str]:
    """The keys one worker of one rank would read, without decoding anything."""
    records = stream.role_records(role, roles)
    if stream.sharded:
        return [r.key for r in records if isinstance(r, ShardRecord)]
    return [str(i) for i in records.tolist()]


def all_keys(name) -> list[str]:
    return [str(i) for i in range(72)] if name == "json" else [f"{i:06d}" for i in range(72)]


@pytest.mark.parametrize("name", ["json", "tar"])
@pytest.mark.parametrize("world_size,workers", [(1, 1), (1, 3), (2, 1), (2, 2), (3, 3), (4, 2)])
@pytest.mark.parametrize("shuffle", [True, False])
def test_ranks_times_workers_cover_every_sample_once(sources, name, world_size, workers, shuffle):
    seen = Counter()
    for rank in range(world_size):
        stream = SampleStream(sources[name], seed=4, shuffle=shuffle, shuffle_buffer=10, rank=rank,
                              world_size=world_size)
        for role in range(workers):
            seen.update(role_keys(stream, role, workers))
    assert sorted(seen) == sorted(all_keys(name)) and set(seen.values()) == {1}


@pytest.mark.parametrize("name", ["json", "tar"])
def test_dataloader_workers_of_each_rank_split_the_data(sources, name):
    per_rank = []
    for rank in range(2):
        loader = ResumableLoader(SampleStream(sources[name], seed=2, rank=rank, world_size=2, decode="bytes"),
                                 batch_size=4, num_workers=2)
        per_rank.append([key for batch in run(loader) for key in batch])
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(all_keys(name))
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= (0 if name == "json" else 8)


def _epoch_order(source, seed, epoch, shuffle=True):
    stream = SampleStream(source, seed=seed, shuffle=shuffle, shuffle_buffer=20, decode="bytes")
    stream.set_epoch(epoch)
    return [s.key for s in stream]


@pytest.mark.parametrize("name", ["json", "tar"])
def test_shuffling_is_seeded_and_changes_every_epoch(sources, name):
    source = sources[name]
    e0, e1 = _epoch_order(source, 7, 0), _epoch_order(source, 7, 1)
    assert sorted(e0) == sorted(e1) and e0 != e1
    assert _epoch_order(source, 7, 0) == e0 and _epoch_order(source, 7, 1) == e1      # reproducible
    assert _epoch_order(source, 8, 0) != e0                                           # the seed matters
    unshuffled = _epoch_order(source, 7, 0, shuffle=False)
    assert unshuffled == sorted(unshuffled, key=lambda k: int(k)) != e0               # file / shard order
    assert _epoch_order(source, 9, 3, shuffle=False) == unshuffled


def test_shuffle_buffer_mixes_across_shards(sources):
    order = _epoch_order(sources["tar"], 7, 0)
    shard_of_first_eight = {int(key) // 8 for key in order[:8]}
    assert len(shard_of_first_eight) > 1


def test_buffer_shuffle_is_a_seeded_permutation():
    items = list(range(100))
    out = list(buffer_shuffle(iter(items), 10, random.Random(1)))
    assert sorted(out) == items and out != items
    assert list(buffer_shuffle(iter(items), 10, random.Random(1))) == out
    assert list(buffer_shuffle(iter(items), 1000, random.Random(1))) != out      # all in the buffer: a full shuffle
    assert list(buffer_shuffle(iter([]), 10, random.Random(1))) == []


def test_idle_workers_are_reported(sources, caplog):
    stream = SampleStream(sources["tar"], rank=3, world_size=4)
    with caplog.at_level(logging.WARNING, logger="blip_fast.data"):
        assert role_keys(stream, 2, 3) == []      # 9 shards, 12 roles
    assert "has no shard to read" in caplog.text


def test_settings_are_checked(sources):
    with pytest.raises(ValueError, match="decode"):
        SampleStream(sources["json"], decode="gpu")
    with pytest.raises(ValueError, match="rank"):
        SampleStream(sources["json"], rank=2, world_size=2)
    with pytest.raises(ValueError, match="seed"):
        SampleStream(sources["json"], seed=-1)
    with pytest.raises(ValueError, match="batch_size"):
        ResumableLoader(SampleStream(sources["json"]), 0)
