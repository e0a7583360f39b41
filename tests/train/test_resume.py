"""A run cut in two and resumed equals the run done in one go: losses, weights, queues, optimizer state."""

import json

import pytest
import torch
from train_helpers import tiny_overrides

from blip_fast.train.checkpointing import list_checkpoints, load_training_checkpoint
from blip_fast.train.config import load_pretrain_config
from blip_fast.train.pretraining import pretrain


def _losses(out):
    """The step records of metrics.jsonl (events such as a resume have a ``kind``)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "kind" not in r]


@pytest.mark.parametrize("batch, stop, total, options", [
    (8, 6, 12, []),                                   # 67 steps per epoch: stop mid-epoch
    (32, 16, 20, ["train.checkpoint_every=0"]),       # 16 steps per epoch: stop exactly at the epoch's end,
])                                                    # resume into the next epoch; checkpoints at epoch ends
def test_resume_continues_exactly(synthetic_dir, tmp_path, batch, stop, total, options, one_intra_op_thread):
    # fp32 on one CPU thread, so the resumed run must equal the straight one bit for bit (with two threads,
    # two straight runs at batch 32 already differ in the last bits: some CPU kernels' summation order
    # depends on how the work is split)
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    quiet = []

    def config(out, steps):
        return load_pretrain_config(None, tiny_overrides(synthetic_dir, out, f"data.batch_size={batch}",
                                                         f"train.max_steps={steps}", "train.epochs=3", *options))

    pretrain(config(straight, total), printer=quiet.append)
    pretrain(config(halves, stop), printer=quiet.append)
    summary = pretrain(config(halves, total), resume=True, printer=quiet.append)
    assert summary.steps == total
    assert any("resuming from" in line and f"step {stop} " in line for line in quiet)

    a, b = _losses(straight), _losses(halves)
    keys = ("step", "loss_itc", "loss_itm", "loss_lm", "lr", "alpha", "temp")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]

    final_a = load_training_checkpoint(list_checkpoints(straight)[-1])
    final_b = load_training_checkpoint(list_checkpoints(halves)[-1])
    assert final_a["progress"] == final_b["progress"]
    for name, tensor in final_a["model"].items():
        assert torch.equal(tensor, final_b["model"][name]), name   # includes momentum weights, queues, pointer
    state_a, state_b = final_a["optimizer"]["state"], final_b["optimizer"]["state"]
    assert all(torch.equal(state_a[k]["exp_avg_sq"], state_b[k]["exp_avg_sq"]) for k in state_a)
    assert final_a["data"] == final_b["data"]


def test_checkpoints_keep_last_k_and_refuse_other_models(synthetic_dir, tmp_path):
    from blip_fast.checkpoint import CheckpointError

    out = tmp_path / "run"
    pretrain(load_pretrain_config(None, tiny_overrides(synthetic_dir, out, "train.max_steps=5",
                                                       "train.checkpoint_every=1", "train.keep_last=2")),
             printer=lambda *_: None)
    assert [p.name for p in list_checkpoints(out)] == ["step-00000004.pt", "step-00000005.pt"]
    assert not list((out / "checkpoints").glob("*.tmp"))
    other = load_pretrain_config(None, tiny_overrides(synthetic_dir, out, "train.max_steps=6", "model.embed_dim=16"))
    with pytest.raises(CheckpointError, match="different model configuration"):
        pretrain(other, resume=True, printer=lambda *_: None)


def test_a_checkpoint_that_cannot_be_written_does_not_end_the_run_but_the_final_one_does(synthetic_dir, tmp_path):
    """A failed write mid-run is a warning that says what is on disk; a failed final write is an error: the trained
    weights would be nowhere."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("a file where the checkpoint folder should be")
    lines = []
    config = load_pretrain_config(None, tiny_overrides(synthetic_dir, out, "train.max_steps=5",
                                                       "train.checkpoint_every=2"))
    with pytest.raises(OSError, match="could not write the final checkpoint, of step 5.*not on disk"):
        pretrain(config, printer=lines.append)
    warnings = [line for line in lines if line.startswith("warning: could not write the checkpoint")]
    assert len(warnings) == 2 and "step 2" in warnings[0] and "step 4" in warnings[1]
    assert all("No checkpoint of this run exists yet" in line for line in warnings)  # not "the previous is intact"


def test_a_failed_write_of_torch_save_does_not_end_the_run(synthetic_dir, tmp_path, monkeypatch):
    """torch.save reports a full disk or an exceeded quota as a RuntimeError of its zip writer: a warning too, naming
    the checkpoint that is intact, and no temporary file is left behind."""
    import blip_fast.checkpoint.io as checkpoint_io

    real_save = checkpoint_io.torch.save
    calls = []

    def full_disk_after_the_first(obj, path):
        calls.append(path)
        if len(calls) == 1:
            return real_save(obj, path)
        open(path, "wb").write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")

    monkeypatch.setattr(checkpoint_io.torch, "save", full_disk_after_the_first)
    out, lines = tmp_path / "run", []
    config = load_pretrain_config(None, tiny_overrides(synthetic_dir, out, "train.max_steps=3",
                                                       "train.checkpoint_every=1"))
    with pytest.raises(OSError, match="final checkpoint"):
        pretrain(config, printer=lines.append)
    warnings = [line for line in lines if line.startswith("warning: could not write the checkpoint")]
    # steps 2 and 3 warn; the end of the run tries step 3 once more, as the final checkpoint
    assert len(warnings) == 2 and "step 2" in warnings[0] and "step 3" in warnings[1]
    assert all("step-00000001.pt" in line for line in warnings)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000001.pt"]


def test_a_checkpoint_of_an_earlier_version_with_an_op_backend_in_its_model_config_resumes(synthetic_dir, tmp_path):
    """Earlier versions wrote ``impl`` into model_config; it is a speed setting, not part of what must match."""
    out = tmp_path / "run"
    pretrain(load_pretrain_config(None, tiny_overrides(synthetic_dir, out, "train.max_steps=2")),
             printer=lambda *_: None)
    path = list_checkpoints(out)[-1]
    payload = torch.load(path, weights_only=True)
    payload["model_config"]["impl"] = "auto"
    torch.save(payload, path)
    summary = pretrain(load_pretrain_config(None, tiny_overrides(synthetic_dir, out, "train.max_steps=3")),
                       resume=True, printer=lambda *_: None)
    assert summary.steps == 3
