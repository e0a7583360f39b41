"""What a run never does: train on or save a non-finite state, delete checkpoints it did not abandon, lose the
final checkpoint without an error, or "succeed" on data without one usable batch."""

import json
import math
import shutil

import pytest
import torch
from backend_helpers import let_backend_run_on
from train_helpers import tiny_overrides

from blip_fast.checkpoint import CheckpointError
from blip_fast.config import ConfigError
from blip_fast.kernels.contrastive import MAX_DIM as ITC_MAX_DIM
from blip_fast.models.blip_pretrain import BlipPretrain
from blip_fast.ops.losses import itc_loss_op
from blip_fast.train.checkpointing import list_checkpoints, load_training_checkpoint
from blip_fast.train.config import load_pretrain_config
from blip_fast.train.divergence import TrainingDiverged
from blip_fast.train.pretraining import Pretrainer, pretrain


def _config(synthetic_dir, out, *extra):
    return load_pretrain_config(None, tiny_overrides(synthetic_dir, out, *extra))


def _records(out):
    """metrics.jsonl, read as strict JSON (NaN and Infinity refused)."""
    def refuse(constant):
        raise ValueError(f"metrics.jsonl holds the non-JSON constant {constant}")

    return [json.loads(line, parse_constant=refuse) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _finite(path) -> bool:
    weights = load_training_checkpoint(path)["model"].values()
    return all(torch.isfinite(t).all() for t in weights if t.is_floating_point())


def _online_weights(state: dict) -> dict:
    """The trained parameters (not the momentum encoders or queues, which the forward itself updates)."""
    return {k: v for k, v in state.items() if "_m." not in k and "queue" not in k}


def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_finite_checkpoint(synthetic_dir, tmp_path):
    out = tmp_path / "run"
    config = _config(synthetic_dir, out, "optim.init_lr=1e6", "optim.warmup_steps=0", "train.max_steps=12",
                     "train.checkpoint_every=1", "train.keep_last=2")
    lines = []
    with pytest.raises(TrainingDiverged, match=r"the loss of step (\d+) is not finite") as caught:
        pretrain(config, printer=lines.append)
    message = str(caught.value)
    first_bad = int(message.split("the loss of step ")[1].split()[0])
    kept = list_checkpoints(out)
    # checks run before every write: nothing at or after the first non-finite step reached the disk
    assert kept and all(int(p.stem[5:]) < first_bad for p in kept)
    assert all(_finite(p) for p in kept)  # the rotation never removed the last finite checkpoint for a NaN one
    assert str(kept[-1]) in message
    records = _records(out)
    assert records[-1]["kind"] == "diverged" and records[-1]["message"] == message


def test_skip_leaves_the_weights_of_a_non_finite_step_untouched(synthetic_dir, tmp_path, monkeypatch):
    """train.nonfinite=skip: the step whose loss is NaN changes no trained weight and no optimizer moment; the run
    goes on and its log says so, with losses averaged over the other steps."""
    forward = BlipPretrain.forward
    calls = []

    def nan_at_step_3(self, *args, **kwargs):
        losses = forward(self, *args, **kwargs)
        calls.append(1)
        return {k: v * math.nan for k, v in losses.items()} if len(calls) == 3 else losses

    monkeypatch.setattr(BlipPretrain, "forward", nan_at_step_3)
    out = tmp_path / "run"
    summary = pretrain(_config(synthetic_dir, out, "train.nonfinite=skip", "train.max_steps=4",
                               "train.checkpoint_every=1", "train.keep_last=4"), printer=lambda *_: None)
    assert summary.steps == 4
    step2, step3, step4 = (load_training_checkpoint(p) for p in list_checkpoints(out)[1:])
    before, after = _online_weights(step2["model"]), _online_weights(step3["model"])
    assert all(torch.equal(before[k], after[k]) for k in before)
    moments = zip(step2["optimizer"]["state"].values(), step3["optimizer"]["state"].values(), strict=True)
    assert all(torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["step"], b["step"]) for a, b in moments)
    changed = _online_weights(step4["model"])
    assert any(not torch.equal(after[k], changed[k]) for k in after)  # the next step trains again
    steps = [r for r in _records(out) if "kind" not in r]
    assert [r["skipped_steps"] for r in steps] == [0, 1]
    assert all(math.isfinite(r["loss"]) for r in steps)


def test_skip_stops_after_too_many_non_finite_steps_in_a_row(synthetic_dir, tmp_path):
    config = _config(synthetic_dir, tmp_path / "run", "optim.init_lr=1e6", "optim.warmup_steps=0",
                     "train.nonfinite=skip", "train.max_consecutive_skips=3", "train.max_steps=40",
                     "train.checkpoint_every=0")
    with pytest.raises(TrainingDiverged, match="3 steps in a row had a non-finite loss or gradient"):
        pretrain(config, printer=lambda *_: None)


@pytest.mark.parametrize("override", ["optim.init_lr=.inf", "optim.weight_decay=.nan", "optim.clip_grad_norm=.nan",
                                      "optim.warmup_lr=.nan", "optim.min_lr=-.inf", "train.alpha_ramp_epochs=.nan",
                                      "optim.eps=.inf", "optim.betas=[.nan, 0.999]"])
def test_non_finite_settings_are_refused(override):
    with pytest.raises(ConfigError, match="finite"):
        load_pretrain_config(None, [override])


@pytest.mark.parametrize("override, message", [
    ("optim.fused=foreach", "needs torch's fused AdamW"),
    ("train.distributed=fsdp", "not supported with train.distributed=fsdp"),
])
def test_skip_refuses_what_cannot_skip_on_the_device(override, message):
    with pytest.raises(ConfigError, match=message):
        load_pretrain_config(None, ["train.nonfinite=skip", override])


def test_resuming_an_older_checkpoint_sets_the_later_ones_aside(synthetic_dir, tmp_path):
    out = tmp_path / "run"
    quiet = []
    pretrain(_config(synthetic_dir, out, "train.max_steps=6", "train.checkpoint_every=1", "train.keep_last=6"),
             printer=quiet.append)
    assert len(list_checkpoints(out)) == 6
    lines = []
    summary = pretrain(_config(synthetic_dir, out, "train.max_steps=4", "train.checkpoint_every=1",
                               "train.keep_last=2"), resume=str(out / "checkpoints" / "step-00000002.pt"),
                       printer=lines.append)
    # the new run's checkpoints survive its own rotation; the abandoned ones are kept aside, not deleted
    assert [p.name for p in list_checkpoints(out)] == ["step-00000003.pt", "step-00000004.pt"]
    aside = [p for p in (out / "checkpoints").iterdir() if p.is_dir()]
    assert len(aside) == 1 and aside[0].name.startswith("abandoned-after-step-00000002-")
    assert sorted(p.name for p in aside[0].iterdir()) == [f"step-0000000{i}.pt" for i in (3, 4, 5, 6)]
    assert any("moved to" in line and "3, 4, 5, 6" in line for line in lines)
    assert summary.checkpoint == str(out / "checkpoints" / "step-00000004.pt")
    # the next plain --resume continues this run, not the abandoned one
    trainer = Pretrainer(_config(synthetic_dir, out, "train.max_steps=5"), resume=True, printer=lambda *_: None)
    assert trainer.progress.step == 4
    trainer.close()
    resume_marks = [r for r in _records(out) if r.get("kind") == "resume"]
    assert [(r["step"], r["checkpoint"].endswith("step-00000002.pt")) for r in resume_marks] == [(2, True)]


def test_a_corrupt_newest_checkpoint_names_the_older_intact_ones(synthetic_dir, tmp_path):
    out = tmp_path / "run"
    pretrain(_config(synthetic_dir, out, "train.max_steps=2", "train.checkpoint_every=1"), printer=lambda *_: None)
    newest = list_checkpoints(out)[-1]
    newest.write_bytes(newest.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="step-00000001.pt"):
        pretrain(_config(synthetic_dir, out, "train.max_steps=3"), resume=True, printer=lambda *_: None)


def test_stale_temporary_files_of_interrupted_writes_are_removed(synthetic_dir, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    stale = out / "checkpoints" / ".step-00000002.pt.k3j4h5.tmp"
    stale.write_bytes(b"half a checkpoint")
    mine = out / "checkpoints" / "notes.tmp"  # not a name atomic_write gives: left alone
    mine.write_text("a user's file")
    lines = []
    pretrain(_config(synthetic_dir, out, "train.max_steps=1"), printer=lines.append)
    assert not stale.exists() and mine.exists()
    assert any(str(stale) in line for line in lines)


def test_resume_refuses_other_data_unless_told_to_restart_it(synthetic_dir, tmp_path):
    out = tmp_path / "run"
    pretrain(_config(synthetic_dir, out, "train.max_steps=2"), printer=lambda *_: None)
    other = tmp_path / "other-data"
    shutil.copytree(synthetic_dir, other)
    with pytest.raises(CheckpointError, match="trained on other data"):
        pretrain(_config(other, out, "train.max_steps=3"), resume=True, printer=lambda *_: None)
    lines = []
    summary = pretrain(_config(other, out, "train.max_steps=3", "train.resume_data_position=false"), resume=True,
                       printer=lines.append)
    assert summary.steps == 3 and any("reading the data from the start" in line for line in lines)


def _missing_images(tmp_path, usable_from, count=40):
    """A JSON list of ``count`` entries whose first ``usable_from`` images do not exist."""
    entries = [{"image": f"missing-{i}.jpg" if i < usable_from else "present.jpg", "caption": f"a photo number {i}"}
               for i in range(count)]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(entries))
    return path


def test_a_dataset_without_one_usable_batch_is_an_error_not_a_random_checkpoint(synthetic_dir, tmp_path):
    annotations = _missing_images(tmp_path, usable_from=40)
    out = tmp_path / "run"
    overrides = [o for o in tiny_overrides(synthetic_dir, out) if not o.startswith("data.synthetic")]
    config = load_pretrain_config(None, overrides + ["data.kind=json", f"data.paths=[{annotations}]",
                                                     f"data.image_root={tmp_path}", "train.epochs=1"])
    with pytest.raises(ValueError, match=r"epoch 0 gave no training batch.*missing_image 40"):
        pretrain(config, printer=lambda *_: None)
    assert not list_checkpoints(out)


def test_steps_after_the_last_log_step_are_logged(synthetic_dir, tmp_path):
    """24 of 40 entries miss their image: the epoch ends after 2 of the 5 announced steps, between log steps."""
    image = next((synthetic_dir / "images").iterdir())
    shutil.copy(image, tmp_path / "present.jpg")
    annotations = _missing_images(tmp_path, usable_from=24)
    out = tmp_path / "run"
    overrides = [o for o in tiny_overrides(synthetic_dir, out) if not o.startswith("data.synthetic")]
    config = load_pretrain_config(None, overrides + ["data.kind=json", f"data.paths=[{annotations}]",
                                                     f"data.image_root={tmp_path}", "train.epochs=1",
                                                     "train.log_every=50"])
    summary = pretrain(config, printer=lambda *_: None)
    steps = [r for r in _records(out) if "kind" not in r]
    assert summary.steps == 2 and [r["step"] for r in steps] == [2]


def test_queue_and_batch_sizes_are_checked_before_the_first_step(synthetic_dir, tmp_path):
    with pytest.raises(ConfigError, match="smaller than the global batch of 8"):
        Pretrainer(_config(synthetic_dir, tmp_path, "model.queue_size=4"), printer=lambda *_: None)
    with pytest.raises(ConfigError, match="multiple of the global batch of 8 pairs with the reference enqueue"):
        Pretrainer(_config(synthetic_dir, tmp_path, "model.queue_size=12", "train.impl=reference"),
                   printer=lambda *_: None)


def test_an_embedding_too_wide_for_the_itc_kernel_is_refused_before_the_first_step(synthetic_dir, tmp_path,
                                                                                      monkeypatch):
    """Where the Triton ITC loss would run (asked for, and here made selectable on the CPU), an embedding wider than it
    holds in registers is a configuration error at start-up; with the reference loss the same width trains."""
    let_backend_run_on(monkeypatch, itc_loss_op, ("cpu", "cuda"))
    wide = f"model.embed_dim={ITC_MAX_DIM + 8}"
    with pytest.raises(ConfigError, match="wider than the Triton ITC loss holds"):
        Pretrainer(_config(synthetic_dir, tmp_path, wide, "train.impl=auto,itc_loss=triton"), printer=lambda *_: None)
    Pretrainer(_config(synthetic_dir, tmp_path, wide, "train.impl=auto,itc_loss=reference"),
               printer=lambda *_: None).close()


def test_an_epoch_shortened_by_bad_entries_plans_the_rest_of_the_run_with_its_count(synthetic_dir, tmp_path):
    """5 steps per epoch are announced for 40 entries; 24 miss their image, so each epoch gives 2. After the first,
    the run plans 2 per epoch (total 4, not 10), and a resume keeps that count."""
    image = next((synthetic_dir / "images").iterdir())
    shutil.copy(image, tmp_path / "present.jpg")
    annotations = _missing_images(tmp_path, usable_from=24)
    out = tmp_path / "run"
    overrides = [o for o in tiny_overrides(synthetic_dir, out) if not o.startswith("data.synthetic")]
    overrides += ["data.kind=json", f"data.paths=[{annotations}]", f"data.image_root={tmp_path}", "train.epochs=2",
                  "train.checkpoint_every=0", "train.keep_last=5"]
    lines = []
    summary = pretrain(load_pretrain_config(None, overrides), printer=lines.append)
    assert any("5 per epoch, or fewer where entries turn out bad" in line for line in lines)
    assert any("epoch 0 gave 2 steps, not the 5 announced" in line and "missing_image 24" in line for line in lines)
    assert summary.steps == 4
    assert load_training_checkpoint(list_checkpoints(out)[0])["progress"]["steps_per_epoch"] == 2
    resumed = Pretrainer(load_pretrain_config(None, overrides), resume=str(list_checkpoints(out)[0]),
                         printer=lambda *_: None)
    assert (resumed.steps_per_epoch, resumed.total_steps) == (2, 4)
    resumed.close()


@pytest.mark.gpu
def test_a_replayed_graph_skips_a_non_finite_step_on_the_device():
    """The skip inside a CUDA graph: the third step's alpha (a graph input) is NaN, which makes its ITC loss NaN but
    not the momentum features it enqueues, so its replay (the graph was captured on the second step) changes no
    trained weight and sets found_inf, and the fourth trains again."""
    from train_helpers import synthetic_step_batch

    from blip_fast.config import tiny_config
    from blip_fast.train.config import OptimConfig
    from blip_fast.train.cuda_graph import CudaGraphStep
    from blip_fast.train.optim import build_optimizer

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = BlipPretrain(tiny_config()).to(device).train()
    optimizer = build_optimizer(model, OptimConfig(), device, capturable=True, skip_nonfinite=True)
    step = CudaGraphStep(model, optimizer, torch.Generator(device=device).manual_seed(1), "fp32",
                         skip_nonfinite=True)
    batches = [synthetic_step_batch(8, seed, device) for seed in range(4)]
    for batch in batches[:2]:  # an eager step, then the capture
        step([batch], 0.4)
    before = {k: v.clone() for k, v in _online_weights(model.state_dict()).items()}
    assert not torch.isfinite(step([batches[2]], math.nan)).all() and optimizer.found_inf.item() == 1
    after = _online_weights(model.state_dict())
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.isfinite(step([batches[3]], 0.4)).all() and optimizer.found_inf.item() == 0
    assert any(not torch.equal(before[k], v) for k, v in _online_weights(model.state_dict()).items())
