"""State dicts in the original BLIP key layout: which task they hold, which shape, and loading.

Our models use the original parameter names (``visual_encoder.blocks.N.attn.qkv.weight``,
``text_encoder.encoder.layer.N.crossattention.self.query.weight``, ``text_decoder.cls...``), so a
Salesforce state dict loads as it is. This module infers the task and the configuration from the
keys and shapes, checks a configuration against the shapes before a model of it is built, loads with
a strict key check, and lists what is missing, unexpected, of another shape or not finite.
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
           for prefix in ("visual_encoder", "text_encoder", "text_decoder", "itm_head", "cls_head")}
    if not has["visual_encoder"]:
        raise CheckpointError("not a BLIP checkpoint: no visual_encoder.* weights")
    if has["text_encoder"] and has["cls_head"]:
        return "nlvr"
    if has["text_encoder"] and has["text_decoder"] and has["itm_head"]:
        return "pretrain"
    if has["text_encoder"] and has["itm_head"]:
        return "retrieval"
    if has["text_encoder"] and has["text_decoder"]:
        return "vqa"
    if has["text_decoder"]:
        return "caption"
    raise CheckpointError("BLIP checkpoint with an image encoder but no text encoder or decoder")


# the modules of each task that hold a text transformer (a caption model's is its decoder's BERT)
TEXT_MODULES = {"pretrain": ("text_encoder", "text_decoder.bert"), "retrieval": ("text_encoder",),
                "caption": ("text_decoder.bert",), "vqa": ("text_encoder", "text_decoder.bert"),
                "nlvr": ("text_encoder",)}


def check_config_fits(config: BlipConfig, state: dict[str, torch.Tensor], task: str, source: str) -> None:
    """The sizes of ``config`` (read from the checkpoint, or inferred) are those of the weights in ``state``.

    Checked before the model is built: a config is data from the file, and a vocabulary of 10**12 or a 64-layer
    65536-wide transformer would otherwise be allocated (or die in the allocator) before load_state compares shapes.
    Layer counts are compared with the block indices of the keys; every other size with the shape of a weight that
    shows it. The feature queues may be missing (they start fresh): then their length is no weight's, and a config may
    ask for no longer a queue than the original's."""
    vision, text = config.vision, config.text
    counts = [("vision.depth", vision.depth, "visual_encoder.blocks")]
    counts += [("text.num_layers", text.num_layers, f"{prefix}.encoder.layer") for prefix in TEXT_MODULES[task]]
    for name, count, prefix in counts:
        held = {m.group(1) for key in state if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", key))}
        if len(held) != count:
            raise CheckpointError(f"{source}: the config has {name} {count}, but the weights hold {len(held)} "
                                  f"{prefix}.N")
    mlp_width = round(vision.width * vision.mlp_ratio)
    shapes = {"visual_encoder.patch_embed.proj.weight": (vision.width, 3, vision.patch_size, vision.patch_size),
              "visual_encoder.pos_embed": (1, vision.num_patches + 1, vision.width)}
    shapes |= {f"visual_encoder.blocks.{i}.mlp.fc1.weight": (mlp_width, vision.width) for i in range(vision.depth)}
    for prefix in TEXT_MODULES[task]:
        shapes[f"{prefix}.embeddings.word_embeddings.weight"] = (text.vocab_size, text.hidden_size)
        shapes[f"{prefix}.embeddings.position_embeddings.weight"] = (text.max_position_embeddings, text.hidden_size)
        shapes |= {f"{prefix}.encoder.layer.{i}.intermediate.dense.weight": (text.intermediate_size, text.hidden_size)
                   for i in range(text.num_layers)}
    queues = {}
    if task in ("pretrain", "retrieval"):
        shapes["vision_proj.weight"] = (config.embed_dim, vision.width)
        shapes["text_proj.weight"] = (config.embed_dim, text.hidden_size)
        queues = {"image_queue": (config.embed_dim, config.queue_size),
                  "text_queue": (config.embed_dim, config.queue_size)}
        if task == "retrieval":
            queues["idx_queue"] = (1, config.queue_size)
    missing = [key for key in shapes if key not in state]
    if missing:
        raise CheckpointError(f"{source} lacks weights that show the sizes of its model:\n"
                              + _listing("missing", missing))
    shapes |= {key: shape for key, shape in queues.items() if key in state}
    _check_shapes(source, [(key, tuple(state[key].shape), shape) for key, shape in shapes.items()])
    if queues and not any(key in state for key in queues) and config.queue_size > BlipConfig.queue_size:
        raise CheckpointError(f"{source} holds no feature queues, and its config asks for fresh ones of "
                              f"queue_size {config.queue_size}, longer than the original's {BlipConfig.queue_size}; "
                              "a checkpoint that needs longer queues must hold them")


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
    _check_shapes(source, [(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in expected if k in state])
    # load_state_dict copies with a cast: quantized or corrupted integer values would load as floats, and
    # complex ones lose their imaginary part with only a warning
    not_float = [f"{k}: {state[k].dtype}" for k in expected
                 if k in state and expected[k].is_floating_point() and not state[k].is_floating_point()]
    if not_float:
        raise CheckpointError(f"{source} has non-floating-point values under floating-point weights:\n  "
                              + "\n  ".join(not_float[:20]))
    _check_tied(model, state, source)
    _check_finite({k: v for k, v in state.items() if k in expected}, source)
    filled = with_momentum_twins(state, expected)
    model.load_state_dict({k: v for k, v in filled.items() if k in expected}, strict=False)


def with_momentum_twins(state: dict[str, torch.Tensor], keys) -> dict[str, torch.Tensor]:
    """``state`` with each momentum key of ``keys`` it lacks (``visual_encoder_m.*``, ...) filled from the online
    weight it shadows, where ``state`` has that: the momentum encoders start as copies of the online ones."""
    filled = dict(state)
    for key in keys:
        twin = re.sub(r"^(\w+)_m\.", r"\1.", key)
        if key not in state and twin != key and twin in state:
            filled[key] = state[twin]
    return filled


def _check_shapes(source: str, shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]]) -> None:
    """``shapes``: (key, the checkpoint's shape, the model's)."""
    mismatched = [f"{key}: checkpoint {held} vs model {wanted}" for key, held, wanted in shapes if held != wanted]
    if mismatched:
        raise CheckpointError(f"{source} has weights of another shape:\n  " + "\n  ".join(mismatched[:20]))


def _check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """NaN or inf weights (a diverged run, a corrupted file) load without complaint and make every output NaN: a
    caption model then emits token 1, ``[unused1]``, for every word."""
    bad = [key for key, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        counts = [f"{key}: {int(state[key].isnan().sum())} NaN, {int(state[key].isinf().sum())} inf of "
                  f"{state[key].numel()}" for key in bad[:5]]
        more = f"\n  ... and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise CheckpointError(f"{source} holds NaN or inf values in {len(bad)} weight(s):\n  " + "\n  ".join(counts)
                              + more)


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
