"""Pretrain -> fine-tune -> evaluate, end to end on the CPU: the tiny BLIP pretrained a few steps on the built-in
scenes, then fine-tuned for retrieval from that checkpoint (``train.init_from``) on the synthetic retrieval set
(five captions per image, ``blip-fast data synth --task retrieval``) through ``blip-fast finetune retrieval``, then
evaluated on its held-out images (ITC top-k re-ranked by ITM) by ``blip-fast eval retrieval``, then zero-shot on
synthetic videos (``blip-fast data synth --task video``) by ``blip-fast eval video``.

The bar: recall@1 both ways at least five times chance (chance 2.5%: 1 in 40 images; for image->text, 5 gold
captions among 200). Seen (2-core CPU, torch 2.13, 2026-12-05): image->text R@1 35.0, text->image R@1 20.0 after
these 500 steps (about 45 s).
"""

import json

import pytest

from blip_fast.cli import main
from blip_fast.data.synth_tasks import write_task_dataset
from blip_fast.train.config import load_pretrain_config
from blip_fast.train.pretraining import pretrain

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def test_pretrain_then_finetune_retrieval_then_evaluate(tmp_path, capsys):
    pre = load_pretrain_config(None, ["data.synthetic_n=800", "train.max_steps=10", f"train.out={tmp_path / 'pre'}",
                                      "train.eval_size=0", "train.tensorboard=false"])
    checkpoint = pretrain(pre, printer=lambda line: None).checkpoint
    data = tmp_path / "retrieval"
    write_task_dataset(data, "retrieval", 400, image_size=64)
    out = tmp_path / "finetune"
    status = main(["finetune", "retrieval", "--config", "tiny-synthetic", "data.kind=json",
                   f"data.paths=[{data / 'train.json'}]", f"data.image_root={data}",
                   f"data.eval_path={data / 'test.json'}", f"train.init_from={checkpoint}", "optim.schedule=cosine",
                   "optim.warmup_steps=0", "optim.init_lr=5e-4", "optim.min_lr=0", "train.epochs=10",
                   "train.alpha_ramp_epochs=1", f"train.out={out}", "train.tensorboard=false", "train.eval_size=40",
                   "train.log_every=50"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert f"initialised the retrieval model from the pretrain checkpoint {checkpoint}" in printed
    assert "left fresh (2): idx_queue, ptr_queue" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 500
    metrics = summary["evaluation"]["metrics"]
    assert metrics["chance_r1"] == pytest.approx(2.5)
    assert metrics["txt_r1"] >= 12.5 and metrics["img_r1"] >= 12.5, metrics
    # the CLI evaluation of the final checkpoint gives the run's own numbers
    metrics_file = tmp_path / "metrics.json"
    status = main(["eval", "retrieval", "--checkpoint", summary["checkpoint"], "--annotations",
                   str(data / "test.json"), "--image-root", str(data), "--k", "16", "--limit", "40", "--json",
                   str(metrics_file)])
    assert status == 0
    assert json.loads(metrics_file.read_text()) == pytest.approx(metrics)
    # zero-shot video retrieval with the same model (as BLIP's MSRVTT result from its COCO retrieval model): the
    # synthetic moving-shape videos against their captions, R@1 both ways at least five times chance (1 in 100).
    # Seen (same machine and day): text->video R@1 9.0, video->text 10.0
    videos = tmp_path / "videos"
    write_task_dataset(videos, "video", 100, image_size=64)
    video_metrics = tmp_path / "video.json"
    assert main(["eval", "video", "--checkpoint", summary["checkpoint"], "--annotations",
                 str(videos / "msrvtt_test.jsonl"), "--video-root", str(videos / "videos"), "--k", "16",
                 "--json", str(video_metrics)]) == 0
    video = json.loads(video_metrics.read_text())
    assert video["chance_r1"] == pytest.approx(1.0)
    assert video["vid_r1"] >= 5.0 and video["txt_r1"] >= 5.0, video


def test_retrieval_fine_tuning_refuses_captions_without_image_ids(tmp_path, capsys):
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps([{"image": "a.jpg", "caption": "a red circle"}] * 40))
    status = main(["finetune", "retrieval", "--config", "tiny-synthetic", "data.kind=json", f"data.paths=[{data}]",
                   f"train.out={tmp_path / 'out'}"])
    assert status == 2
    assert "retrieval fine-tuning needs an image_id" in capsys.readouterr().err


def test_the_best_epoch_on_validation_is_kept_and_evaluated_at_the_end(tmp_path, capsys):
    data = tmp_path / "retrieval"
    write_task_dataset(data, "retrieval", 80, image_size=64)
    out = tmp_path / "finetune"
    status = main(["finetune", "retrieval", "--config", "tiny-synthetic", "data.kind=json", "data.batch_size=16",
                   "model.queue_size=64", f"data.paths=[{data / 'train.json'}]", f"data.image_root={data}",
                   f"data.val_path={data / 'val.json'}", f"data.eval_path={data / 'test.json'}", "train.epochs=3",
                   "optim.schedule=cosine", "optim.warmup_steps=0", f"train.out={out}", "train.tensorboard=false",
                   "train.eval_itm_k=4", "train.checkpoint_every=0"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    validations = [r for r in records if r.get("kind") == "val"]
    assert [r["epoch"] for r in validations] == [0, 1, 2]
    best = max(validations, key=lambda r: (r["r_mean"], -r["epoch"]))  # the first of equal scores is kept
    final = next(r for r in records if r.get("kind") == "eval")
    assert final["best_epoch"] == best["epoch"]
    assert f"fine-tuned the best epoch's ({best['epoch']}) retrieval on 8 images" in printed
    assert (out / "best.pth").is_file()
    # the final evaluation is the best weights' own, not the last epoch's (unless the last is the best)
    status = main(["eval", "retrieval", "--checkpoint", str(out / "best.pth"), "--annotations",
                   str(data / "test.json"), "--image-root", str(data), "--k", "4", "--json", str(tmp_path / "m.json")])
    assert status == 0
    assert json.loads((tmp_path / "m.json").read_text()) == pytest.approx(
        {k: v for k, v in final.items() if k not in ("kind", "step", "best_epoch", "time")})


def test_a_missing_validation_split_is_refused_before_training(tmp_path, capsys):
    data = tmp_path / "retrieval"
    write_task_dataset(data, "retrieval", 40, image_size=64)
    status = main(["finetune", "retrieval", "--config", "tiny-synthetic", "data.kind=json",
                   f"data.paths=[{data / 'train.json'}]", f"data.image_root={data}",
                   f"data.val_path={data / 'vall.json'}", f"train.out={tmp_path / 'out'}"])
    assert status == 2
    assert f"data.val_path {data / 'vall.json'} is not a file" in capsys.readouterr().err


def _finetune_rank(rank, port, args):
    import os

    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    assert main(args) == 0


def test_two_ranks_evaluate_their_shares_and_report_what_one_process_computes(tmp_path):
    # validation and the final test both split over two gloo ranks; the single-process CLI evaluation of the kept
    # best epoch gives the same recalls (fp32; one intra-op thread everywhere, equal to 1e-6)
    import torch.multiprocessing as mp
    from train_helpers import free_port

    data = tmp_path / "retrieval"
    write_task_dataset(data, "retrieval", 60, image_size=64)
    out = tmp_path / "finetune"
    args = ["finetune", "retrieval", "--config", "tiny-synthetic", "data.kind=json", "data.batch_size=8",
            "data.num_workers=0", "model.queue_size=64", f"data.paths=[{data / 'train.json'}]",
            f"data.image_root={data}", f"data.val_path={data / 'val.json'}", f"data.eval_path={data / 'test.json'}",
            "train.epochs=2", "optim.warmup_steps=0", f"train.out={out}", "train.tensorboard=false",
            "train.eval_itm_k=3", "train.checkpoint_every=0", "train.device=cpu"]
    mp.spawn(_finetune_rank, args=(free_port(), args), nprocs=2, join=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    best_epoch = next(r for r in records if r.get("kind") == "eval")["best_epoch"]
    validation = next(r for r in records if r.get("kind") == "val" and r["epoch"] == best_epoch)
    evaluation = json.loads((out / "summary.json").read_text())["evaluation"]
    assert evaluation["ranks"] == 2
    final = evaluation["metrics"]
    for split, expected in (("val", validation), ("test", final)):
        metrics_file = tmp_path / f"{split}.json"
        assert main(["eval", "retrieval", "--checkpoint", str(out / "best.pth"), "--annotations",
                     str(data / f"{split}.json"), "--image-root", str(data), "--k", "3", "--json",
                     str(metrics_file)]) == 0
        for name, value in json.loads(metrics_file.read_text()).items():
            assert expected[name] == pytest.approx(value, abs=1e-6), (split, name)
