"""A run cut in two and resumed equals the run done in one go: losses, weights, queues, optimizer state."""

import json

import torch
from train_helpers import tiny_overrides

from blip_fast.train.checkpointing import list_checkpoints, load_checkpoint
from blip_fast.train.config import load_pretrain_config
from blip_fast.train.engine import pretrain


def _losses(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_continues_exactly(synthetic_dir, tmp_path):
    # 12 steps of 8 pairs over 540 training scenes: mid-epoch stop and resume; fp32 on the CPU, so exact
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    quiet = []
    pretrain(load_pretrain_config(None, tiny_overrides(synthetic_dir, straight, "train.max_steps=12")),
             printer=quiet.append)
    pretrain(load_pretrain_config(None, tiny_overrides(synthetic_dir, halves, "train.max_steps=6")),
             printer=quiet.append)
    summary = pretrain(load_pretrain_config(None, tiny_overrides(synthetic_dir, halves, "train.max_steps=12")),
                       resume=True, printer=quiet.append)
    assert summary.steps == 12
    assert any("resuming from" in line and "step 6" in line for line in quiet)

    a, b = _losses(straight), _losses(halves)
    keys = ("step", "loss_itc", "loss_itm", "loss_lm", "lr", "alpha", "temp")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]

    final_a = load_checkpoint(list_checkpoints(straight)[-1])
    final_b = load_checkpoint(list_checkpoints(halves)[-1])
    assert final_a["progress"] == final_b["progress"]
    for name, tensor in final_a["model"].items():
        assert torch.equal(tensor, final_b["model"][name]), name   # includes momentum weights, queues, pointer
    state_a, state_b = final_a["optimizer"]["state"], final_b["optimizer"]["state"]
    assert all(torch.equal(state_a[k]["exp_avg_sq"], state_b[k]["exp_avg_sq"]) for k in state_a)
    assert final_a["data"] == final_b["data"]


def test_checkpoints_keep_last_k_and_refuse_other_models(synthetic_dir, tmp_path):
    import pytest

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
