"""State dicts in the original BLIP key layout: which task they hold, which shape, and loading.

Our models use the original parameter names (``visual_encoder.blocks.N.attn.qkv.weight``,
``text_encoder.encoder.layer.N.crossattention.self.query.weight``, ``text_decoder.cls...``), so a
Salesforce state dict loads as it is. This module infers the task and the configuration from the
keys and shapes, loads with a strict key check, and lists what is missing or unexpected.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..config import BlipConfig, TextConfig, VisionConfig
from ..models.vit import position_embedding_for
from .io import CheckpointError

# Buffers and parameters a checkpoint may lack without harm: training-only state (queues, their
# pointers, image ids) stays at its fresh value; momentum copies start as copies of their online
# twins (the original ``copy_params``); ``temp`` keeps its initial 0.07 (Hugging Face drops it).
ALLOWED_MISSING = re.compile(r"^(image_queue|text_queue|queue_ptr|idx_queue|ptr_queue|temp"
                             r"|(visual_encoder|vision_proj|text_encoder|text_proj)_m\..*)$")
# Keys older checkpoints carry that are not parameters of ours (BERT's position_ids buffer).
ALLOWED_UNEXPECTED = re.compile(r".*embeddings\.position_ids$")


def detect_task(state: dict[str, torch.Tensor]) -> str:
    has = {prefix: any(k.startswith(prefix + ".") for k in state)
           for prefix in ("visual_encoder", "text_encoder", "text_decoder", "itm_head")}
    if not has["visual_encoder"]:
        raise CheckpointError("not a BLIP checkpoint: no visual_encoder.* weights")
    if has["text_encoder"] and has["text_decoder"] and has["itm_head"]:
        return "pretrain"
    if has["text_encoder"] and has["itm_head"]:
        return "retrieval"
    if has["text_encoder"] and has["text_decoder"]:
        return "vqa"
    if has["text_decoder"]:
        return "caption"
    raise CheckpointError("BLIP checkpoint with an image encoder but no text encoder or decoder")


def infer_config(state: dict[str, torch.Tensor], task: str) -> BlipConfig:
    """The :class:`BlipConfig` whose shapes match ``state`` (dropouts etc. at their defaults)."""
    try:
        patch = state["visual_encoder.patch_embed.proj.weight"]
        positions = state["visual_encoder.pos_embed"].shape[1] - 1
        depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"visual_encoder\.blocks\.(\d+)\.", k)))
        width = patch.shape[0]
        mlp_hidden = state["visual_encoder.blocks.0.mlp.fc1.weight"].shape[0]
        text_prefix = "text_encoder" if task != "caption" else "text_decoder.bert"
        words = state[f"{text_prefix}.embeddings.word_embeddings.weight"]
        text_layers = 1 + max(int(m.group(1)) for k in state
                              if (m := re.match(rf"{re.escape(text_prefix)}\.encoder\.layer\.(\d+)\.", k)))
        intermediate = state[f"{text_prefix}.encoder.layer.0.intermediate.dense.weight"].shape[0]
        max_positions = state[f"{text_prefix}.embeddings.position_embeddings.weight"].shape[0]
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{task} checkpoint lacks a weight needed to infer its shape: {error}") from None
    side = int(round(positions ** 0.5))
    hidden = words.shape[1]
    vision = VisionConfig(image_size=side * patch.shape[-1], patch_size=patch.shape[-1], width=width,
                          depth=depth, num_heads=_heads(width), mlp_ratio=mlp_hidden / width)
    text = TextConfig(vocab_size=words.shape[0], hidden_size=hidden, num_layers=text_layers,
                      num_heads=_heads(hidden), intermediate_size=intermediate,
                      max_position_embeddings=max_positions)
    config = BlipConfig(vision=vision, text=text)
    if "vision_proj.weight" in state:
        config.embed_dim = state["vision_proj.weight"].shape[0]
    if "image_queue" in state:
        config.queue_size = state["image_queue"].shape[1]
    return config


def _heads(width: int) -> int:
    # BLIP's checkpoints use 64-wide heads throughout (ViT-B 12, ViT-L 16, BERT-base 12)
    return max(1, width // 64)


def resize_position_embeddings(state: dict[str, torch.Tensor], image_size: int, patch_size: int) -> None:
    """Resample ``pos_embed`` (and its momentum copy) for ``image_size`` in place, as the
    original ``interpolate_pos_embed`` does when fine-tuning at 384 px from 224 px."""
    grid = (image_size // patch_size, image_size // patch_size)
    for key in ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed"):
        if key in state:
            state[key] = position_embedding_for(state[key], grid).contiguous()


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``; any missing or unexpected key outside the allow-lists is
    a :class:`CheckpointError` that lists them. Missing momentum copies are filled from the
    online weights."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    bad_missing = [k for k in missing if not ALLOWED_MISSING.match(k)]
    bad_unexpected = [k for k in unexpected if not ALLOWED_UNEXPECTED.match(k)]
    if bad_missing or bad_unexpected:
        raise CheckpointError(f"{source} does not fit a {type(model).__name__}:\n"
                              + _listing("missing", bad_missing) + _listing("unexpected", bad_unexpected))
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in state and state[k].shape != expected[k].shape]
    if mismatched:
        raise CheckpointError(f"{source} has weights of another shape:\n  " + "\n  ".join(mismatched[:20]))
    filled = dict(state)
    for key in missing:
        twin = re.sub(r"^(\w+)_m\.", r"\1.", key)
        if twin != key and twin in state:
            filled[key] = state[twin]
    model.load_state_dict({k: v for k, v in filled.items() if k in expected}, strict=False)


def _listing(kind: str, keys: list[str]) -> str:
    if not keys:
        return ""
    shown = "\n    ".join(keys[:25])
    more = f"\n    ... and {len(keys) - 25} more" if len(keys) > 25 else ""
    return f"  {len(keys)} {kind} key(s):\n    {shown}{more}\n"
