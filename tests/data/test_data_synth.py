"""``blip-fast data synth``: deterministic, fast, both formats agree, and the noise is recorded exactly."""

import json
import time

import pytest
from PIL import Image

from blip_fast.cli import main
from blip_fast.data.annotations import CaptionAnnotations, RetrievalAnnotations
from blip_fast.data.sample import DataStats
from blip_fast.data.shards import TarShards
from blip_fast.data.stream import SampleStream
from blip_fast.data.synth import split_sizes, write_synthetic_dataset
from blip_fast.data.synthetic import SceneObject, caption


def files(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def shard_samples(root, split: str) -> dict:
    stream = SampleStream(TarShards(str(root / "shards" / f"{split}-*.tar")), shuffle=False, decode="bytes")
    return {s.key: s for s in stream}


def test_same_seed_same_bytes(tmp_path):
    write_synthetic_dataset(tmp_path / "a", 40, noise=0.3, image_size=24, seed=3, shard_size=7)
    write_synthetic_dataset(tmp_path / "b", 40, noise=0.3, image_size=24, seed=3, shard_size=7)
    write_synthetic_dataset(tmp_path / "c", 40, noise=0.3, image_size=24, seed=4, shard_size=7)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys()
    assert a["train.json"] != c["train.json"] and a["images/000000.jpg"] != c["images/000000.jpg"]


def test_layout_splits_and_formats(synth):
    info = json.loads((synth / "info.json").read_text())
    assert {k: v["samples"] for k, v in info["splits"].items()} == {"train": 72, "val": 4, "test": 4}
    assert info["splits"]["train"]["shards"] == [f"shards/train-{i:05d}.tar" for i in range(9)]
    assert split_sizes(1000, (0.9, 0.05, 0.05)) == {"train": 900, "val": 50, "test": 50}
    train = json.loads((synth / "train.json").read_text())
    assert train[0] == {"image": "images/000000.jpg", "caption": train[0]["caption"], "image_id": "000000"}
    assert all(isinstance(e["caption"], str) for e in train)
    for split, first in (("val", 72), ("test", 76)):
        entries = json.loads((synth / f"{split}.json").read_text())
        assert [e["image_id"] for e in entries] == [f"{i:06d}" for i in range(first, first + 4)]
        assert RetrievalAnnotations(synth / f"{split}.json", synth).img2txt == [[0], [1], [2], [3]]
    with Image.open(synth / "images" / "000005.jpg") as image:
        assert image.size == (24, 24) and image.format == "JPEG"


def test_shards_and_json_lists_hold_the_same_samples(synth):
    for split in ("train", "val", "test"):
        shards = shard_samples(synth, split)
        entries = json.loads((synth / f"{split}.json").read_text())
        assert list(shards) == [e["image_id"] for e in entries]
        for entry in entries:
            sample = shards[entry["image_id"]]
            assert sample.image_bytes == (synth / entry["image"]).read_bytes()
            text = entry["caption"] if split == "train" else entry["caption"][0]
            assert sample.caption == text == sample.extra["meta"]["caption"]
    source = CaptionAnnotations(synth / "train.json", synth)
    assert source.sample(3, DataStats()).image_path == str(synth / "images" / "000003.jpg")


def test_noise_is_recorded_exactly(synth):
    noise = json.loads((synth / "noise.json").read_text())
    train = {e["image_id"]: e["caption"] for e in json.loads((synth / "train.json").read_text())}
    shards = shard_samples(synth, "train")
    assert noise["fraction"] == 0.25 and noise["count"] == len(noise["samples"]) == 18      # round(0.25 * 72)
    assert json.loads((synth / "info.json").read_text())["noisy"] == 18
    originals = {key: caption([SceneObject(**o) for o in s.extra["meta"]["scene"]]) for key, s in shards.items()}
    for key, record in noise["samples"].items():
        assert key in train
        assert train[key] == shards[key].caption == record["caption"] != record["original_caption"]
        assert record["original_caption"] == originals[key]                       # the scene really is that
        assert record["caption"] == originals[record["caption_from"]]             # another scene's caption
        assert shards[key].extra["meta"]["noisy"] and shards[key].extra["meta"]["original_caption"] == originals[key]
    for key, text in train.items():
        if key not in noise["samples"]:
            assert text == originals[key] and not shards[key].extra["meta"]["noisy"]
            assert "original_caption" not in shards[key].extra["meta"]
    for split in ("val", "test"):
        for sample in shard_samples(synth, split).values():
            assert not sample.extra["meta"]["noisy"]


def test_all_noise_and_tiny_sets(tmp_path):
    info = write_synthetic_dataset(tmp_path / "all", 30, noise=1.0, image_size=16, seed=1)
    assert json.loads((tmp_path / "all" / "noise.json").read_text())["count"] == info["splits"]["train"]["samples"]
    info = write_synthetic_dataset(tmp_path / "one", 1, image_size=16)
    assert {k: v["samples"] for k, v in info["splits"].items()} == {"train": 1, "val": 0, "test": 0}
    assert json.loads((tmp_path / "one" / "val.json").read_text()) == []


def test_thousand_samples_in_a_few_seconds(tmp_path):
    start = time.perf_counter()
    write_synthetic_dataset(tmp_path, 1000, noise=0.1)          # default 128 px
    elapsed = time.perf_counter() - start
    assert len(list((tmp_path / "images").iterdir())) == 1000
    assert elapsed < 10, f"{elapsed:.1f} s"                     # ~1 s on a laptop core; room for a busy CI box


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["data", "synth", "--out", str(out), "--n", "30", "--noise", "0.1", "--seed", "2", "--image-size", "32",
            "--shard-size", "10"]
    assert main(args) == 0
    assert "wrote 30 synthetic samples (train 26, val 2, test 2; 3 noisy training captions)" in capsys.readouterr().out
    written = files(out)
    assert main(args) == 2                                      # will not write over a dataset
    assert "not empty" in capsys.readouterr().err
    (out / "shards" / "stale-00009.tar").write_bytes(b"old")   # not written by synth: --overwrite refuses
    assert main(args + ["--overwrite"]) == 2
    assert "did not write (shards/stale-00009.tar)" in capsys.readouterr().err
    (out / "shards" / "stale-00009.tar").unlink()
    assert main(args[:-1] + ["4", "--overwrite"]) == 0          # a run with more shards (train-00006 ...)
    assert main(args + ["--overwrite"]) == 0
    assert files(out) == written                                # same seed, same bytes; its extra shards gone
    write_synthetic_dataset(tmp_path / "api", 30, noise=0.1, seed=2, image_size=32, shard_size=10)
    assert files(tmp_path / "api") == written
    for bad in (["--noise", "1.5"], ["--n", "0"], ["--shard-size", "0"]):
        assert main(["data", "synth", "--out", str(tmp_path / "x"), "--n", "5"] + bad) == 2
        assert "error:" in capsys.readouterr().err


def test_cli_needs_a_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["data"])
