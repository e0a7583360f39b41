"""Planted faults, through the command line a user runs: each ends in a finished run that counted what it skipped,
or in one line on stderr and a non-zero exit, never a traceback, and never with a checkpoint lost.

Each test runs ``python -m blip_fast.cli pretrain`` in a subprocess on the tiny model (a few seconds each): bad
images and a bad shard in the data, ``kill -9`` in the middle of a checkpoint write and then ``--resume``, a
diverging run, a disk that fills up (``RLIMIT_FSIZE``: writes past the limit fail with EFBIG, as on a full disk),
and an output folder that is a file.
"""

import json
import resource
import signal
import subprocess
import sys
import time

from train_helpers import tiny_overrides

from blip_fast.train.checkpointing import checkpoint_step, list_checkpoints


def _cli(*args, limit_bytes=None, timeout=240):
    def limit():
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, "-m", "blip_fast.cli", "pretrain", *args], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit)


def _one_line_error(result, code):
    assert result.returncode == code, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


def _without_synthetic(overrides):
    return [o for o in overrides if not o.startswith("data.synthetic")]


def test_bad_images_are_skipped_and_counted(synthetic_dir, tmp_path):
    entries = json.loads((synthetic_dir / "train.json").read_text())[:48]
    images = tmp_path / "images"
    images.mkdir()
    for i, entry in enumerate(entries):
        data = (synthetic_dir / entry["image"]).read_bytes()
        target = images / f"{i}.jpg"
        if i % 6 == 0:
            data = data[: len(data) // 2]           # cut inside the image data
        elif i % 6 == 1:
            data = b"not an image at all"
        if i % 6 != 2:                              # every sixth image is missing
            target.write_bytes(data)
        entry["image"] = f"images/{i}.jpg"
    entries.append({"image": "images/0.jpg", "caption": "   "})   # no usable caption
    annotations = tmp_path / "train.json"
    annotations.write_text(json.dumps(entries))
    out = tmp_path / "run"
    result = _cli(*_without_synthetic(tiny_overrides(synthetic_dir, out)), "data.kind=json",
                  f"data.paths=[{annotations}]", f"data.image_root={tmp_path}", "train.epochs=1")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3   # 32 usable pairs of 49 entries: 4 batches of 8, the last one partial
    assert "corrupt_image 16" in summary["data"] and "missing_image 8" in summary["data"]
    assert "no_caption 1" in summary["data"]


def test_a_bad_shard_is_skipped_and_counted(synthetic_dir, tmp_path):
    good = sorted((synthetic_dir / "shards").glob("train-*.tar"))[:2]
    broken = tmp_path / "broken.tar"
    broken.write_bytes(good[0].read_bytes()[:3000] + b"\0garbage" * 100)   # cut, then noise
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    out = tmp_path / "run"
    shards = ",".join(str(p) for p in [*good, broken, empty])
    result = _cli(*_without_synthetic(tiny_overrides(synthetic_dir, out)), "data.kind=shards",
                  f"data.paths=[{shards}]", "data.steps_per_epoch=20", "train.epochs=1", "train.max_steps=20")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert "bad_shard" in summary["data"] and summary["steps"] > 0


def test_kill_during_a_checkpoint_write_then_resume(synthetic_dir, tmp_path):
    out = tmp_path / "run"
    args = [*tiny_overrides(synthetic_dir, out), "train.checkpoint_every=1", "train.keep_last=2"]
    process = subprocess.Popen([sys.executable, "-m", "blip_fast.cli", "pretrain", *args, "train.max_steps=200"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    folder = out / "checkpoints"
    deadline, caught = time.monotonic() + 180, None
    while time.monotonic() < deadline and process.poll() is None:
        temps = list(folder.glob(".step-*.tmp")) if folder.is_dir() else []
        if temps and list_checkpoints(out):  # a write in progress, with an earlier checkpoint complete
            process.send_signal(signal.SIGKILL)
            caught = temps[0]
            break
        time.sleep(0.002)
    process.wait(timeout=30)
    assert caught is not None, "no checkpoint write was seen in progress"
    intact = list_checkpoints(out)[-1]
    result = _cli(*args, f"train.max_steps={checkpoint_step(intact) + 2}", "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not list(folder.glob(".step-*.tmp"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == checkpoint_step(intact) + 2


def test_divergence_exits_with_one_line(synthetic_dir, tmp_path):
    result = _cli(*tiny_overrides(synthetic_dir, tmp_path / "run"), "optim.init_lr=1e6", "optim.warmup_steps=0",
                  "train.max_steps=10", "train.checkpoint_every=1")
    line = _one_line_error(result, 1)
    assert "training diverged: the loss of step" in line and "the last good one is" in line


def test_a_full_disk_is_a_warning_until_the_final_checkpoint(synthetic_dir, tmp_path):
    result = _cli(*tiny_overrides(synthetic_dir, tmp_path / "run"), "train.max_steps=3", "train.checkpoint_every=1",
                  limit_bytes=8 << 20)   # far below a checkpoint of the tiny model (~100 MB)
    line = _one_line_error(result, 2)
    assert "could not write the final checkpoint, of step 3" in line and "No checkpoint of this run exists" in line
    assert result.stdout.count("warning: could not write the checkpoint") == 3


def test_an_output_folder_that_is_a_file(synthetic_dir, tmp_path):
    out = tmp_path / "run"
    out.write_text("a file")
    line = _one_line_error(_cli(*tiny_overrides(synthetic_dir, out), "train.max_steps=1"), 2)
    assert str(out) in line


def test_nothing_of_a_user_is_deleted_where_the_synthetic_data_would_go(tmp_path):
    """data.synthetic_dir at a folder of the user's: refused, every file still there."""
    folder = tmp_path / "mine"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "holiday.jpg").write_bytes(b"\xff\xd8 a photo")
    (folder / "train.json").write_text("[]")
    result = _cli(f"data.synthetic_dir={folder}", "data.synthetic_n=50", f"train.out={tmp_path / 'run'}",
                  "train.max_steps=1")
    _one_line_error(result, 2)
    assert (folder / "images" / "holiday.jpg").read_bytes() == b"\xff\xd8 a photo"
    assert (folder / "train.json").read_text() == "[]"
