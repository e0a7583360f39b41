"""A task model other than pretraining's trains through the shared engine, with the speed function applied: caption
fine-tuning (BlipCaption, LM loss of prompt + caption) on the built-in scenes, its blocks compiled on the CPU."""

import json

import torch
from train_helpers import tiny_overrides

from blip_fast.checkpoint import load_checkpoint
from blip_fast.models import BlipCaption
from blip_fast.text import BlipTokenizer
from blip_fast.train.caption import CaptionTrainer, finetune_caption
from blip_fast.train.checkpointing import list_checkpoints
from blip_fast.train.config import load_pretrain_config


def test_caption_fine_tuning_trains_through_the_engine_with_speed_applied(synthetic_dir, tmp_path):
    out = tmp_path / "run"
    config = load_pretrain_config(None, tiny_overrides(synthetic_dir, out, "train.compile=true", "train.max_steps=8",
                                                       "train.checkpoint_every=4"))
    trainer = CaptionTrainer(config, printer=lambda *_: None)
    try:
        assert isinstance(trainer.model, BlipCaption)
        compiled = [m for m in trainer.model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
        assert len(compiled) == 4  # 2 ViT blocks + 2 decoder layers of the tiny preset
        # every caption starts with [CLS] and the prompt, which the loss leaves out: the original's prompt_length
        prompt = BlipTokenizer()(["a picture of "], max_length=30).input_ids[0, :-1]
        assert trainer.prompt_length == len(prompt) == 4
        batch = next(iter(trainer.batches))
        assert torch.equal(batch.input_ids[:, :4], prompt.expand(batch.input_ids.shape[0], -1))
    finally:
        trainer.close()
    lines = []
    summary = finetune_caption(config, printer=lines.append)
    assert summary.steps == 8 and lines[0].startswith("caption fine-tuning tiny BLIP")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss_lm"] for r in records]
    assert set(records[0]) >= {"loss", "loss_lm", "lr", "samples_per_s"} and "loss_itc" not in records[0]
    assert losses[-1] < losses[0]  # it learns
    checkpoints = list_checkpoints(out)
    assert [p.name for p in checkpoints] == ["step-00000004.pt", "step-00000008.pt"]
    assert isinstance(load_checkpoint(checkpoints[-1]), BlipCaption)  # a training checkpoint loads as the model
