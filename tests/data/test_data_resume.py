"""A loader restored from ``state_dict()`` continues with exactly the batches the uninterrupted loader gave.

The data has skipped samples (so stream positions and sample counts differ) and workers with
unequal shares (so some run out before others), the cases that break naive resuming.
"""

import json

import pytest
from data_helpers import run

from blip_fast.data.annotations import CaptionAnnotations
from blip_fast.data.loader import ResumableLoader
from blip_fast.data.shards import ShardWriter, TarShards
from blip_fast.data.stream import SampleStream


@pytest.fixture(scope="module")
def sources(synth, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    entries = json.loads((synth / "train.json").read_text())
    for i, bad in enumerate([{"image": "images/missing.jpg", "caption": "gone"}, {"image": "images/000001.jpg"},
                             "not an object", {"image": "images/000002.jpg", "caption": " "}]):
        entries.insert(7 + 17 * i, bad)
    (root / "train.json").write_text(json.dumps(entries))
    # extra shards: a small one with bad members, and one cut short
    with ShardWriter(root, "extra", 5) as writer:
        jpg = (synth / "images" / "000003.jpg").read_bytes()
        writer.write("x0", {"jpg": jpg, "txt": b"good one"})
        writer.write("x1", {"txt": b"no image"})
        writer.write("x2", {"jpg": b"", "txt": b"empty image"})
        writer.write("x3", {"jpg": jpg, "txt": b""})
        writer.write("x4", {"jpg": jpg, "txt": b"good two"})
        writer.write("x5", {"jpg": jpg, "txt": b"good three"})
    cut = root / "extra-00001.tar"
    cut.write_bytes(cut.read_bytes()[:700])
    shards = sorted(str(p) for p in (synth / "shards").glob("train-*.tar")) + [str(p) for p in writer.paths]
    return {"json": CaptionAnnotations(root / "train.json", synth), "tar": TarShards(shards)}


def make(source, workers, batch_size=4, drop_last=False, decode="bytes"):
    stream = SampleStream(source, seed=11, shuffle_buffer=9, decode=decode)
    return ResumableLoader(stream, batch_size, num_workers=workers, drop_last=drop_last)


def counts(stats):
    return stats.samples, dict(stats.skipped), dict(stats.fixed)


def check_resume(make_loader, cuts):
    reference = make_loader()
    full = run(reference)
    full_counts = counts(reference.stats)
    assert reference.epoch == 1
    next_epoch = run(reference)
    for cut in cuts(len(full)):
        first = make_loader()
        head = run(first, cut)
        assert first.samples == sum(map(len, head))
        state = json.loads(json.dumps(first.state_dict()))          # a checkpoint holds it as JSON
        resumed = make_loader()
        resumed.load_state_dict(state)
        assert resumed.epoch == 0 and resumed.samples == first.samples
        tail = run(resumed)
        assert head + tail == full, f"resumed after batch {cut}"
        assert counts(resumed.stats) == full_counts, f"resumed after batch {cut}"
        assert run(resumed) == next_epoch                              # and the next epoch is the same too
    return full


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("name", ["json", "tar"])
def test_resume_continues_with_the_next_sample(sources, name, workers):
    cuts = (lambda n: [1, n // 2, n - 1]) if workers == 2 else (lambda n: [n // 3])
    full = check_resume(lambda: make(sources[name], workers), cuts)
    keys = [key for batch in full for key in batch]
    assert len(keys) == len(set(keys)) == (72 if name == "json" else 74)   # x5 is lost with its cut shard


def test_resume_when_one_worker_has_run_out(sources):
    """Cut after every batch of the stretch where one worker has run out and the other goes on."""
    loader = make(sources["tar"], 2)
    positions = [loader.state_dict()["positions"] for _ in loader]
    uneven = [i + 1 for i, p in enumerate(positions) if -1 in p and max(p) > 0]
    assert len(uneven) >= 2
    check_resume(lambda: make(sources["tar"], 2), lambda n: uneven[:3])


def test_resume_with_drop_last_and_decoding(sources):
    full = check_resume(lambda: make(sources["tar"], 2, batch_size=5, drop_last=True, decode="pil"),
                        lambda n: [n // 2])
    assert all(len(batch) == 5 for batch in full)


def test_state_at_the_end_of_an_epoch_resumes_the_next(sources):
    reference = make(sources["json"], 2)
    run(reference)
    state = reference.state_dict()
    assert state["epoch"] == 1 and state["samples"] == 0 and state["positions"] == [0, 0]
    epoch1 = run(reference)
    resumed = make(sources["json"], 2)
    resumed.load_state_dict(state)
    assert run(resumed) == epoch1


def test_set_epoch_restarts_other_epochs_and_keeps_the_current_one(sources):
    loader = make(sources["json"], 0)
    head = run(loader, 3)
    loader.set_epoch(0)                    # same epoch: continue (the usual `for epoch ...: set_epoch(epoch)`)
    rest = run(loader)
    reference = make(sources["json"], 0)
    assert head + rest == run(reference)
    loader.set_epoch(5)
    fifth = run(loader)
    other = make(sources["json"], 0)
    other.set_epoch(5)
    assert fifth == run(other) and loader.epoch == 6


def test_resume_needs_the_same_settings(sources):
    state = make(sources["json"], 2).state_dict()
    with pytest.raises(ValueError, match="roles"):
        make(sources["json"], 3).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        make(sources["json"], 2, batch_size=8).load_state_dict(state)
    other_seed = ResumableLoader(SampleStream(sources["json"], seed=12, shuffle_buffer=9), 4, num_workers=2)
    with pytest.raises(ValueError, match="seed"):
        other_seed.load_state_dict(state)
