"""``data synth --overwrite`` deletes only the files a previous run listed in its ``info.json``, and nothing else."""

import json
import os

import pytest

from blip_fast.data import synth
from blip_fast.data.synth import write_synthetic_dataset

ARGS = dict(n=12, image_size=16, seed=1, shard_size=4)


def files(root) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def dataset(tmp_path):
    out = tmp_path / "data"
    write_synthetic_dataset(out, **ARGS)
    return out


def test_the_manifest_lists_every_file_written(dataset):
    info = json.loads((dataset / "info.json").read_text())
    assert set(info["files"]) | {"info.json"} == set(files(dataset))
    assert info["files"] == sorted(info["files"])


@pytest.mark.parametrize("mine,named", [("images/mine.jpg", "images/mine.jpg"), ("shards/mine.tar", "shards/mine.tar"),
                                        ("train.json.bak", "train.json.bak"), ("notes/a.txt", "notes"),
                                        ("empty_dir/", "empty_dir")])
def test_overwrite_refuses_files_it_did_not_write_and_keeps_everything(dataset, mine, named):
    target = dataset / mine
    if mine.endswith("/"):
        target.mkdir()
    else:
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(b"the user's")
    before = files(dataset)
    with pytest.raises(ValueError, match=f"did not write \\({named}\\)"):
        write_synthetic_dataset(dataset, **ARGS, overwrite=True)
    assert files(dataset) == before and target.exists()


def test_overwrite_names_a_few_unknown_files(dataset):
    for i in range(5):
        (dataset / "images" / f"user{i}.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"\(images/user0.jpg, images/user1.jpg, images/user2.jpg and 2 more\)"):
        write_synthetic_dataset(dataset, **ARGS, overwrite=True)


def test_a_users_folder_without_manifest_is_refused_and_kept(tmp_path):
    """The defect: --overwrite deleted a user's images/, shards/ and train.json (no info.json there)."""
    out = tmp_path / "users"
    (out / "images").mkdir(parents=True)
    (out / "shards").mkdir()
    (out / "images" / "cat.jpg").write_bytes(b"cat")
    (out / "shards" / "web-00000.tar").write_bytes(b"tar")
    (out / "train.json").write_text("[]")
    before = files(out)
    for overwrite in (False, True):          # the trainer calls with overwrite=False for a folder without info.json
        with pytest.raises(ValueError) as error:
            write_synthetic_dataset(out, **ARGS, overwrite=overwrite)
        message = str(error.value)
        assert str(out) in message and "not empty" in message and "not a dataset this command wrote" in message
        assert "delete it by hand" in message
    assert files(out) == before


def test_a_run_that_stopped_early_is_not_guessed_at(tmp_path, monkeypatch):
    """info.json is written last; without it nothing says which files are ours, so --overwrite refuses too."""
    out = tmp_path / "half"
    calls = []

    def draw_then_crash(*args):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return real_draw(*args)

    real_draw = synth.draw
    monkeypatch.setattr(synth, "draw", draw_then_crash)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_dataset(out, **ARGS)
    monkeypatch.setattr(synth, "draw", real_draw)
    assert not (out / "info.json").exists() and (out / "images" / "000004.jpg").exists()
    with pytest.raises(ValueError, match="choose an empty folder, or delete it by hand"):
        write_synthetic_dataset(out, **ARGS, overwrite=True)
    assert (out / "images" / "000004.jpg").exists()


def test_a_linked_folder_is_never_deleted_through(dataset, tmp_path):
    elsewhere = tmp_path / "photos"
    os.rename(dataset / "images", elsewhere)                 # the user's folder, files of the very names listed
    (dataset / "images").symlink_to(elsewhere, target_is_directory=True)
    before = files(elsewhere)
    with pytest.raises(ValueError, match="did not write \\(images\\)"):
        write_synthetic_dataset(dataset, **ARGS, overwrite=True)
    assert files(elsewhere) == before


@pytest.mark.parametrize("entry", ["../victim.txt", "/tmp/victim.txt", "images/../../victim.txt", 7])
def test_a_manifest_entry_outside_the_folder_is_refused(dataset, tmp_path, entry):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    info = json.loads((dataset / "info.json").read_text())
    info["files"].append(entry)
    (dataset / "info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="not a dataset this command wrote"):
        write_synthetic_dataset(dataset, **ARGS, overwrite=True)
    assert victim.read_text() == "keep me" and (dataset / "images" / "000000.jpg").exists()


def test_overwrite_replaces_its_own_dataset_with_another(dataset):
    write_synthetic_dataset(dataset, n=20, image_size=16, seed=2, shard_size=3, overwrite=True)
    info = json.loads((dataset / "info.json").read_text())
    assert info["n"] == 20 and set(info["files"]) | {"info.json"} == set(files(dataset))
    write_synthetic_dataset(dataset, **ARGS, overwrite=True)   # fewer images and shards: the extra ones go
    assert set(json.loads((dataset / "info.json").read_text())["files"]) | {"info.json"} == set(files(dataset))
