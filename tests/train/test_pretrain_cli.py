"""`blip-fast pretrain`: what a user sees -- outputs of a short run, and clear errors for mistakes."""

import json

import pytest
from train_helpers import tiny_overrides

from blip_fast.cli import main


def test_short_run_writes_everything(synthetic_dir, tmp_path, capsys):
    out = tmp_path / "run"
    overrides = [o for o in tiny_overrides(synthetic_dir, out) if not o.startswith(("train.tensorboard",
                                                                                   "train.eval_size"))]
    assert main(["pretrain", *overrides, "train.max_steps=4", "train.eval_size=30", "train.eval_itm_k=4"]) == 0
    printed = capsys.readouterr().out
    assert "pretraining tiny BLIP" in printed and "step 4/4" in printed and "ETA" in printed
    assert "zero-shot retrieval on 30 images / 30 captions (ITC top-4 re-ranked by ITM)" in printed
    assert "data: 32 samples; skipped 0" in printed
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4]
    evaluation = next(r for r in records if r.get("kind") == "eval")
    assert 0 <= evaluation["txt_r1"] <= 100 and evaluation["chance_r1"] == pytest.approx(100 / 30)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["evaluation"]["images"] == 30
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "checkpoints" / "step-00000004.pt").is_file()
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["resolved_model"]["vision"]["image_size"] == 64
    assert resolved["train"]["cuda_graph"] is False  # auto, resolved: what ran (a CPU has no graphs)


def test_print_config_and_overrides(capsys):
    assert main(["pretrain", "--print-config", "data.batch_size=12", "--config", "tiny-synthetic"]) == 0
    assert json.loads(capsys.readouterr().out)["data"]["batch_size"] == 12


@pytest.mark.parametrize("args, message", [
    (["optim.lr=1"], "unknown key(s) in optim: lr"),
    (["--config", "nope.yaml"], "neither a file nor one of the shipped configs"),
    (["--config", "base"], "needs data.paths"),
    (["--config", "base", "data.paths=[/nonexistent/ann.json]"], "/nonexistent/ann.json"),
    (["train.cuda_graph=true", "train.device=cpu", "optim.grad_accum_steps=2"],
     "train.cuda_graph=true needs a CUDA device (this run trains on cpu)"),
    (["train.fp8_vit=true", "train.device=cpu"], "train.fp8_vit=true needs a CUDA GPU with FP8 matmuls"),
    (["train.cuda_graph=sometimes"], "train.cuda_graph must be true, false or auto; got 'sometimes'"),
    (["train.cuda_graph=2"], "train.cuda_graph must be bool or str; got 2 (int)"),
])
def test_mistakes_end_in_one_line(args, message, capsys, tmp_path):
    assert main(["pretrain", f"train.out={tmp_path}", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_resume_of_a_file_that_is_not_a_training_checkpoint(synthetic_dir, tmp_path, capsys):
    import torch

    bogus = tmp_path / "weights.pt"
    torch.save({"model": {}}, bogus)
    assert main(["pretrain", *tiny_overrides(synthetic_dir, tmp_path / "run"), "--resume", str(bogus)]) == 2
    assert "not a blip-fast training checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("options", [
    ["optim.grad_accum_steps=2", "optim.clip_grad_norm=1.0", "optim.fused=foreach"],
    ["train.precision=bf16", "optim.decay_norms_and_biases=false", "optim.fused=loop", "optim.temp_lr=null"],
])
def test_training_options_run(synthetic_dir, tmp_path, options):
    from blip_fast.train.config import load_pretrain_config
    from blip_fast.train.pretraining import pretrain

    config = load_pretrain_config(None, [*tiny_overrides(synthetic_dir, tmp_path), "train.max_steps=4", *options])
    summary = pretrain(config, printer=lambda *_: None)
    accum = config.optim.grad_accum_steps
    assert summary.steps == 4 and summary.samples == 4 * 8 * accum
    assert all(0 < v < 20 for v in summary.last_losses.values())
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["samples_per_s"] > 0


def test_ctrl_c_ends_with_a_hint_not_a_traceback(synthetic_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    # a run far longer than the test (it must still be training when interrupted), its lines unbuffered so that
    # "step 2/" arrives when it is printed, not when a pipe buffer fills; and Ctrl-C's default handling, which a
    # suite started in the background by a shell without job control inherits as "ignored"
    command = [sys.executable, "-m", "blip_fast.cli", "pretrain", *tiny_overrides(synthetic_dir, tmp_path),
               "train.log_every=1", "train.checkpoint_every=1", "train.epochs=1000"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in process.stdout:     # wait until training runs
        if line.startswith("step 2/"):
            break
    process.send_signal(signal.SIGINT)
    try:
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()  # a run that ignored the interrupt must not outlive the test
    assert process.returncode == 130
    assert "interrupted (checkpoints are written atomically; continue with --resume)" in err
    assert "Traceback" not in err
    from blip_fast.train.checkpointing import list_checkpoints, load_training_checkpoint

    # the interrupt may land inside a checkpoint write: that one is abandoned, the earlier ones stay readable
    assert load_training_checkpoint(list_checkpoints(tmp_path)[-1])["progress"]["step"] >= 1
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_the_evaluation_runs_in_fp32_after_bf16_training(synthetic_dir, tmp_path, monkeypatch):
    """bf16 similarities tie and reorder retrieval candidates; the original evaluates in fp32, and so does the run's
    end-of-training evaluation whatever train.precision says."""
    import torch

    import blip_fast.train.pretraining as pretraining
    from blip_fast.train.config import load_pretrain_config

    seen = []
    evaluate = pretraining.evaluate_retrieval

    def recording(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(pretraining, "evaluate_retrieval", recording)
    pretraining.pretrain(load_pretrain_config(None, tiny_overrides(synthetic_dir, tmp_path, "train.max_steps=1",
                                                              "train.precision=bf16", "train.eval_size=20")),
                    printer=lambda *_: None)
    assert seen == [False]


def test_resume_followed_by_an_override_resumes_the_latest_checkpoint(tmp_path, monkeypatch):
    """`--resume train.max_steps=5`: the override is an override, not the path of a checkpoint."""
    import blip_fast.train.pretraining as pretraining

    seen = {}
    monkeypatch.setattr(pretraining, "pretrain", lambda config, resume: seen.update(config=config, resume=resume))
    assert main(["pretrain", f"train.out={tmp_path}", "--resume", "train.max_steps=5"]) == 0
    assert seen["resume"] is True and seen["config"].train.max_steps == 5


def test_a_binary_config_file_is_named(tmp_path, capsys):
    config = tmp_path / "model.pth"
    config.write_bytes(bytes(range(256)) * 4)
    assert main(["pretrain", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(config) in err and "Traceback" not in err


def test_a_diverging_run_exits_non_zero_with_one_line(synthetic_dir, tmp_path, capsys):
    args = ["pretrain", *tiny_overrides(synthetic_dir, tmp_path / "run"), "optim.init_lr=1e6",
            "optim.warmup_steps=0", "train.max_steps=8"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: training diverged: the loss of step") and "Traceback" not in err
