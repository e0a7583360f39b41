"""Shards round-trip through the writer and the reader, and a broken shard never yields a partial sample."""

import gzip
import json

import pytest
from data_helpers import encode, photo_like, write_tar

from blip_fast.data.loader import ResumableLoader
from blip_fast.data.sample import BadSample, DataStats
from blip_fast.data.shards import ShardFailure, ShardRecord, ShardWriter, TarShards, read_shard
from blip_fast.data.stream import SampleStream


def _samples(n: int):
    return [(f"{i:06d}", encode(photo_like(20 + i % 3, 16, seed=i), "JPEG", quality=80), f"caption number {i}")
            for i in range(n)]


def _write(directory, samples, max_count):
    with ShardWriter(directory, "train", max_count) as writer:
        for key, jpg, caption in samples:
            writer.write(key, {"jpg": jpg, "txt": caption.encode(), "json": json.dumps({"caption": caption}).encode()})
    return writer.paths


def test_round_trip_identical_bytes_and_captions(tmp_path):
    samples = _samples(23)
    paths = _write(tmp_path, samples, max_count=5)
    assert [p.name for p in paths] == [f"train-{i:05d}.tar" for i in range(5)]
    assert not list(tmp_path.glob("*.tmp"))
    stream = SampleStream(TarShards(str(tmp_path)), shuffle=False, decode="bytes")
    read = [(s.key, s.image_bytes, s.caption, s.extra["meta"]) for s in stream]
    assert read == [(key, jpg, caption, {"caption": caption}) for key, jpg, caption in samples]
    assert stream.stats.samples == 23 and not stream.stats.skipped


def test_round_trip_through_a_shuffling_loader_loses_nothing(tmp_path):
    samples = _samples(23)
    _write(tmp_path, samples, max_count=4)
    loader = ResumableLoader(SampleStream(TarShards(str(tmp_path)), seed=1, shuffle_buffer=7, decode="bytes"),
                             batch_size=5, num_workers=2)
    read = {s.key: (s.image_bytes, s.caption) for batch in loader for s in batch}
    assert read == {key: (jpg, caption) for key, jpg, caption in samples}


def test_writer_is_deterministic(tmp_path):
    samples = _samples(7)
    first = _write(tmp_path / "a", samples, 3)
    second = _write(tmp_path / "b", samples, 3)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


def test_writer_rejects_dotted_keys(tmp_path):
    with ShardWriter(tmp_path, "x") as writer, pytest.raises(ValueError, match="dot"):
        writer.write("a.b", {"txt": b"x"})


@pytest.mark.parametrize("compress", [False, True])
def test_a_cut_shard_yields_only_whole_samples_then_a_failure(tmp_path, compress):
    samples = _samples(4)
    path = _write(tmp_path / "full", samples, max_count=10)[0]
    data = path.read_bytes()
    if compress:
        data = gzip.compress(data, mtime=0)
    expected = {key: {"jpg": jpg, "txt": caption.encode(), "json": json.dumps({"caption": caption}).encode()}
                for key, jpg, caption in samples}
    cut_path = tmp_path / "cut.tar"
    step = 7 if compress else 61
    for cut in list(range(0, len(data), step)) + [len(data)]:
        cut_path.write_bytes(data[:cut])
        records = list(read_shard(str(cut_path)))
        whole = [r for r in records if isinstance(r, ShardRecord)]
        for record in whole:                       # every record yielded is complete and intact
            assert record.files == expected[record.key], f"cut {cut}"
        assert [r.key for r in whole] == list(expected)[:len(whole)]
        failures = [r for r in records if isinstance(r, ShardFailure)]
        if len(whole) < len(samples):
            assert len(failures) == 1 and records[-1] is failures[0], f"cut {cut}: no failure reported"
        else:
            assert not failures


def test_missing_and_broken_shards_are_counted_not_fatal(tmp_path):
    samples = _samples(6)
    good = _write(tmp_path, samples, max_count=3)
    broken = tmp_path / "broken.tar"
    broken.write_bytes(good[1].read_bytes()[:3000])
    source = TarShards([str(good[0]), str(tmp_path / "missing.tar"), str(broken)])
    stream = SampleStream(source, shuffle=False)
    keys = [s.key for s in stream]
    assert keys[:3] == [key for key, _, _ in samples[:3]]
    assert set(keys[3:]) <= {key for key, _, _ in samples[3:]}
    assert stream.stats.skipped["bad_shard"] == 2
    assert "missing.tar" in stream.stats.first["bad_shard"]


def test_odd_member_groups(tmp_path):
    jpg = encode(photo_like(16, 16), "JPEG")
    path = write_tar(tmp_path / "odd.tar", [
        ("a.jpg", jpg), ("a.txt", b"first"), ("a.txt", b"second"),        # repeated member
        ("b.txt", b"no image"),                                            # no image
        ("c.jpg", jpg), ("c.png", jpg), ("c.txt", b"two images"),          # ambiguous image
        ("d.jpg", jpg), ("d.json", b"{broken"),                            # broken json
        ("e.jpg", jpg), ("e.txt", b"\xff\xfe bad utf-8"),                  # caption not UTF-8
        ("f.jpg", jpg), ("f.json", json.dumps({"caption": ""}).encode()),  # empty caption
        ("g.jpg", jpg), ("g.json", json.dumps({"url": "x"}).encode()),     # no caption at all
        ("h.jpg", jpg), ("h.txt", b"fine"),
    ])
    source = TarShards(str(path))
    outcome = {}
    for record in read_shard(str(path)):
        try:
            outcome[record.key] = source.sample(record, DataStats()).caption
        except BadSample as error:
            outcome[record.key] = error.reason
    assert outcome == {"a": "bad_record", "b": "missing_image", "c": "bad_record", "d": "bad_record",
                       "e": "no_caption", "f": "no_caption", "g": "no_caption", "h": "fine"}
