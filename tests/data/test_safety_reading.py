"""Reading user files never waits forever and never brings more than MAX_SAMPLE_BYTES of one sample into memory."""

import io
import os
import tarfile

import pytest
from data_helpers import encode, photo_like, write_json, write_tar
from timeouts import release_fifo, within

from blip_fast.data import decode, shards
from blip_fast.data.annotations import CaptionAnnotations
from blip_fast.data.decode import read_image_file
from blip_fast.data.sample import MAX_SAMPLE_BYTES, BadSample
from blip_fast.data.shards import TarShards
from blip_fast.data.stream import SampleStream

JPEG = encode(photo_like(16, 12), "JPEG")


def reason(call) -> BadSample:
    with pytest.raises(BadSample) as info:
        call()
    return info.value


def test_the_cap_is_far_above_real_samples():
    assert MAX_SAMPLE_BYTES == 64 << 20


def test_a_shard_member_over_the_cap_is_skipped_and_never_read(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "MAX_SAMPLE_BYTES", 4096)
    big = bytes(5000)
    path = write_tar(tmp_path / "s.tar", [("a.jpg", JPEG), ("a.txt", b"a red circle"),
                                          ("b.txt", b"a blue square"), ("b.jpg", big),
                                          ("c.jpg", JPEG), ("c.txt", b"a green star")])
    read = []
    extract = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda tar, member: read.append(member.name) or
                        extract(tar, member))
    stream = SampleStream(TarShards(str(path)), shuffle=False, decode="bytes")
    assert [s.key for s in stream] == ["a", "c"]
    assert stream.stats.skipped == {"sample_too_large": 1}
    assert "b.jpg brings the sample to 5013 bytes" in stream.stats.first["sample_too_large"]
    assert "b.jpg" not in read


def test_many_members_of_one_key_count_together(tmp_path, monkeypatch):
    """Each member under the cap, but a key may have any number of extensions: their sum is capped."""
    monkeypatch.setattr(shards, "MAX_SAMPLE_BYTES", 4096)
    members = [("a.jpg", JPEG), ("a.txt", b"a red circle")] + [(f"a.x{i}", bytes(1000)) for i in range(6)]
    path = write_tar(tmp_path / "s.tar", members + [("b.jpg", JPEG), ("b.txt", b"a cat")])
    stream = SampleStream(TarShards(str(path)), shuffle=False, decode="bytes")
    assert [s.key for s in stream] == ["b"] and stream.stats.skipped == {"sample_too_large": 1}


def test_a_gzipped_shard_passes_over_a_big_member_without_holding_it(tmp_path, monkeypatch):
    """The defect's shape: a big member of zeros in a small .tar.gz (held whole in memory before)."""
    monkeypatch.setattr(shards, "MAX_SAMPLE_BYTES", 1 << 20)
    path = tmp_path / "zeros.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("a.jpg", JPEG), ("a.txt", b"a red circle")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("b.jpg")
        info.size = 8 << 20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
        info = tarfile.TarInfo("b.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"zeros"))
    assert path.stat().st_size < 100_000
    stream = SampleStream(TarShards(str(path)), shuffle=False, decode="bytes")
    assert [s.key for s in stream] == ["a"] and stream.stats.skipped == {"sample_too_large": 1}


def test_a_fifo_named_like_a_shard_is_a_bad_shard_not_a_hang(tmp_path):
    good = write_tar(tmp_path / "a.tar", [("a.jpg", JPEG), ("a.txt", b"a red circle")])
    fifo = tmp_path / "b.tar"
    os.mkfifo(fifo)
    stream = SampleStream(TarShards(str(tmp_path)), shuffle=False, decode="bytes")
    assert [s.key for s in within(5, lambda: list(stream), release_fifo(fifo))] == ["a"]
    assert stream.stats.skipped == {"bad_shard": 1} and "not a regular file" in stream.stats.first["bad_shard"]
    assert good.exists()


def test_an_image_file_over_the_cap_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(decode, "MAX_SAMPLE_BYTES", 1000)
    (tmp_path / "big.jpg").write_bytes(bytes(1001))
    (tmp_path / "at_the_cap.jpg").write_bytes(bytes(1000))
    error = reason(lambda: read_image_file(tmp_path / "big.jpg"))
    assert error.reason == "sample_too_large" and "1001 bytes" in error.detail
    assert read_image_file(tmp_path / "at_the_cap.jpg") == bytes(1000)


def test_a_fifo_in_a_json_list_is_skipped_not_waited_on(tmp_path):
    (tmp_path / "a.jpg").write_bytes(JPEG)
    os.mkfifo(tmp_path / "pipe.jpg")
    entries = [{"image": "pipe.jpg", "caption": "a pipe"}, {"image": "a.jpg", "caption": "a photo"}]
    stream = SampleStream(CaptionAnnotations(write_json(tmp_path / "train.json", entries), tmp_path), shuffle=False)
    samples = within(5, lambda: list(stream), release_fifo(tmp_path / "pipe.jpg"))
    assert [s.image_path for s in samples] == [str(tmp_path / "a.jpg")]
    assert stream.stats.skipped == {"missing_image": 1}
    assert "is not a regular file" in stream.stats.first["missing_image"]


def test_a_device_is_not_an_image_file():
    # /dev/null rather than /dev/zero, which code without the check would read until memory runs out
    error = within(5, lambda: reason(lambda: read_image_file("/dev/null")))
    assert error.reason == "missing_image" and "not a regular file" in error.detail


def test_a_directory_is_not_an_image_file(tmp_path):
    error = reason(lambda: read_image_file(tmp_path))
    assert error.reason == "missing_image" and "is a directory" in error.detail
