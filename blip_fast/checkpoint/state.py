"""State dicts in the original BLIP key layout: which task they hold, which shape, and loading.

Our models use the original parameter names (``visual_encoder.blocks.N.attn.qkv.weight``,
``text_encoder.encoder.layer.N.crossattention.self.query.weight``, ``text_decoder.cls...``), so a
Salesforce state dict loads as it is. This module infers the task and the configuration from the
keys and shapes, loads with a strict key check, and lists what is missing or unexpected.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from ..config import BlipConfig, ConfigError, TextConfig, VisionConfig
from ..models.vit import position_embedding_for
from .io import CheckpointError

log = logging.getLogger(__name__)

# Buffers and parameters a checkpoint may lack without harm: training-only state (queues, their
# pointers, image ids) stays at its fresh value; momentum copies start as copies of their online
# twins (the original ``copy_params``); ``temp`` keeps its initial 0.07 (Hugging Face drops it).
ALLOWED_MISSING = re.compile(r"^(image_queue|text_queue|queue_ptr|idx_queue|ptr_queue|temp"
                             r"|(visual_encoder|vision_proj|text_encoder|text_proj)_m\..*)$")
# Keys older checkpoints carry that are not parameters of ours (BERT's position_ids buffer).
ALLOWED_UNEXPECTED = re.compile(r".*embeddings\.position_ids$")


def check_tensors(state: dict, source: str) -> None:
    """Every value of ``state`` is a tensor: a weights-only ``torch.load`` also accepts lists, numbers,
    None and nested dicts, which would fail later with an AttributeError that names nothing."""
    bad = [f"{k} ({type(v).__name__})" for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source} holds values that are not tensors under weight names:\n"
                              + _listing("non-tensor", bad))


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
    vocab = words.shape[0]
    defaults = TextConfig()
    if vocab <= max(defaults.bos_token_id, defaults.enc_token_id):
        raise CheckpointError(f"{task} checkpoint's text vocabulary has {vocab} rows: it lacks BLIP's "
                              f"[DEC]={defaults.bos_token_id} and [ENC]={defaults.enc_token_id} tokens (a plain "
                              "BERT vocabulary, not resized as BLIP's init_tokenizer does)")
    # The shapes do not hold the number of heads: _heads guesses it. Checkpoints whose widths are not
    # BLIP's published ones should carry their config (ours and the trainer's do); say that we guessed.
    guessed = {"vision": (width, _heads(width)), "text": (hidden, _heads(hidden))}
    unusual = {k: v for k, v in guessed.items() if v[0] not in _PUBLISHED_WIDTHS}
    if unusual:
        log.warning("%s checkpoint carries no config: attention heads guessed from the widths as 64-wide heads (%s); "
                    "a model trained with other heads computes differently", task,
                    ", ".join(f"{k} width {w} -> {h} heads" for k, (w, h) in unusual.items()))
    try:
        vision = VisionConfig(image_size=side * patch.shape[-1], patch_size=patch.shape[-1], width=width,
                              depth=depth, num_heads=_heads(width), mlp_ratio=mlp_hidden / width)
        text = TextConfig(vocab_size=vocab, hidden_size=hidden, num_layers=text_layers,
                          num_heads=_heads(hidden), intermediate_size=intermediate,
                          max_position_embeddings=max_positions)
    except ConfigError as error:
        raise CheckpointError(f"{task} checkpoint has shapes no BLIP config fits: {error}") from None
    config = BlipConfig(vision=vision, text=text)
    if "vision_proj.weight" in state:
        config.embed_dim = state["vision_proj.weight"].shape[0]
    if "image_queue" in state:
        config.queue_size = state["image_queue"].shape[1]
    return config


# widths of BLIP's released models (ViT-B and BERT-base 768, ViT-L 1024), all with 64-wide heads
_PUBLISHED_WIDTHS = (768, 1024)


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
    a :class:`CheckpointError` that lists them, as are weights of another shape, integer, bool or
    complex values under floating-point weights, and different values under two keys that name one
    tensor of the model. Missing momentum copies are filled from the online weights."""
    check_tensors(state, source)
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
    # load_state_dict copies with a cast: quantized or corrupted integer values would load as floats, and
    # complex ones lose their imaginary part with only a warning
    not_float = [f"{k}: {state[k].dtype}" for k in expected
                 if k in state and expected[k].is_floating_point() and not state[k].is_floating_point()]
    if not_float:
        raise CheckpointError(f"{source} has non-floating-point values under floating-point weights:\n  "
                              + "\n  ".join(not_float[:20]))
    _check_tied(model, state, source)
    filled = dict(state)
    for key in missing:
        twin = re.sub(r"^(\w+)_m\.", r"\1.", key)
        if twin != key and twin in state:
            filled[key] = state[twin]
    model.load_state_dict({k: v for k, v in filled.items() if k in expected}, strict=False)


def _check_tied(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Keys naming one tensor of the model (a caption model's LM head and word embeddings; the
    modules pretraining shares between text encoder and decoder) must hold equal values: loading
    them one after the other would keep the last and silently drop the others."""
    names: dict[int, list[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), []).append(key)
    differing = []
    for keys in names.values():
        held = [k for k in keys if k in state]
        if len(held) < 2:
            continue
        first = state[held[0]]
        if any(not torch.equal(first, state[k].to(first.dtype)) for k in held[1:]):
            differing.append(" = ".join(held))
    if differing:
        raise CheckpointError(f"{source} holds different values under keys that {type(model).__name__} ties "
                              "(one tensor; the model cannot hold both):\n  " + "\n  ".join(differing[:20]))


def _listing(kind: str, keys: list[str]) -> str:
    if not keys:
        return ""
    shown = "\n    ".join(keys[:25])
    more = f"\n    ... and {len(keys) - 25} more" if len(keys) > 25 else ""
    return f"  {len(keys)} {kind} key(s):\n    {shown}{more}\n"
