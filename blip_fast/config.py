"""Model configuration: nested dataclasses, validated on construction, with named presets.

The fields and defaults mirror the original code: ``configs/med_config.json`` (the BERT-base text
transformer), ``models/vit.py`` / ``create_vit`` (the image encoder) and the task YAML files
(``embed_dim``, ``queue_size``, ``momentum``, ``alpha``, prompt). ``config_from_dict`` builds a
config from plain data (YAML, a checkpoint) and rejects unknown or ill-typed keys by name.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

TASKS = ("pretrain", "retrieval", "caption", "vqa", "nlvr")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


@dataclass
class VisionConfig:
    image_size: int = 224
    """Input resolution in pixels (square). Position embeddings are interpolated for others."""
    patch_size: int = 16
    """Side of the square patches the image is cut into."""
    width: int = 768
    """Token width (ViT-B 768, ViT-L 1024)."""
    depth: int = 12
    """Number of transformer blocks (ViT-B 12, ViT-L 24)."""
    num_heads: int = 12
    """Attention heads per block."""
    mlp_ratio: float = 4.0
    """Hidden width of the MLP relative to ``width``."""
    layer_norm_eps: float = 1e-6
    """LayerNorm epsilon (the original ViT uses 1e-6; Hugging Face BLIP checkpoints say 1e-5)."""
    drop_path_rate: float = 0.0
    """Stochastic depth rate at the last block, ramped linearly from 0 (0.1 for ViT-L in BLIP)."""
    grad_checkpointing: bool = False
    """Recompute block activations in backward to save memory."""

    def __post_init__(self):
        _positive(self, "image_size", "patch_size", "width", "depth", "num_heads", "mlp_ratio", "layer_norm_eps")
        if round(self.width * self.mlp_ratio) < 1:
            raise ConfigError(f"vision.mlp_ratio {self.mlp_ratio} gives an MLP of no units at width {self.width}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.num_heads:
            raise ConfigError(f"vision.width {self.width} is not divisible by num_heads {self.num_heads}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"vision.drop_path_rate must be in [0, 1); got {self.drop_path_rate}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class TextConfig:
    vocab_size: int = 30524
    """BERT uncased (30,522) plus [DEC] = 30522 and [ENC] = 30523."""
    hidden_size: int = 768
    """Token width of the text transformer."""
    num_layers: int = 12
    """Transformer layers (each: self-attention, cross-attention, feed-forward)."""
    num_heads: int = 12
    """Attention heads."""
    intermediate_size: int = 3072
    """Feed-forward hidden width."""
    max_position_embeddings: int = 512
    """Longest text the learned position embeddings cover."""
    layer_norm_eps: float = 1e-12
    """LayerNorm epsilon of BERT."""
    hidden_dropout: float = 0.1
    """Dropout after embeddings, attention output and feed-forward (BERT's hidden_dropout_prob)."""
    attention_dropout: float = 0.1
    """Dropout on attention probabilities (BERT's attention_probs_dropout_prob)."""
    initializer_range: float = 0.02
    """Std of the normal init of Linear and Embedding weights."""
    pad_token_id: int = 0
    cls_token_id: int = 101
    sep_token_id: int = 102
    bos_token_id: int = 30522
    """[DEC]: first token of every decoder input."""
    enc_token_id: int = 30523
    """[ENC]: first token of every image-grounded encoder input."""

    def __post_init__(self):
        _positive(self, "vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                  "max_position_embeddings", "layer_norm_eps", "initializer_range")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"text.hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"text.{name} must be in [0, 1); got {getattr(self, name)}")
        for name in ("pad_token_id", "cls_token_id", "sep_token_id", "bos_token_id", "enc_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ConfigError(f"text.{name} {getattr(self, name)} is outside the vocabulary of {self.vocab_size}")


@dataclass
class BlipConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    """The image encoder."""
    text: TextConfig = field(default_factory=TextConfig)
    """The text transformer (encoder and decoder share this shape)."""
    embed_dim: int = 256
    """Width of the ITC projections."""
    queue_size: int = 57600
    """Momentum feature queue length (pretraining and retrieval)."""
    momentum: float = 0.995
    """EMA coefficient of the momentum encoders."""
    alpha: float = 0.4
    """Momentum distillation weight of the ITC targets."""
    temp: float = 0.07
    """Initial ITC temperature (learned, clamped to [0.001, 0.5])."""
    label_smoothing: float = 0.1
    """Label smoothing of the LM loss."""
    prompt: str = "a picture of "
    """Captioning prompt; its tokens are excluded from the LM loss."""
    max_text_length: int = 30
    """Tokens per caption in pretraining (35 for retrieval and VQA questions)."""
    negative_all_rank: bool = False
    """Retrieval: sample hard negatives from all ranks' batches."""

    def __post_init__(self):
        _positive(self, "embed_dim", "queue_size", "max_text_length")
        if not 0.0 < self.momentum < 1.0:
            raise ConfigError(f"momentum must be in (0, 1); got {self.momentum}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1]; got {self.alpha}")
        if not 0.001 <= self.temp <= 0.5:
            raise ConfigError(f"temp must be in [0.001, 0.5]; got {self.temp}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1); got {self.label_smoothing}")


# torch holds tensor dimensions as int64: a larger size could only fail deep inside torch
LARGEST_SIZE = 2**63 - 1


def _positive(obj, *names: str) -> None:
    """Sizes and scales: above zero and at most :data:`LARGEST_SIZE`. That refuses inf, and NaN too (it fails every
    comparison: ``x <= 0`` alone would pass it)."""
    for name in names:
        value = getattr(obj, name)
        if not 0 < value <= LARGEST_SIZE:
            raise ConfigError(f"{type(obj).__name__}.{name} must be positive and at most 2**63 - 1; got {value}")


# ---------------------------------------------------------------- presets


def tiny_config(image_size: int = 64) -> BlipConfig:
    """A few-hundred-thousand-parameter BLIP for tests and CPU demos (real vocabulary)."""
    return BlipConfig(
        vision=VisionConfig(image_size=image_size, patch_size=16, width=64, depth=2, num_heads=4),
        text=TextConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                        max_position_embeddings=64),
        embed_dim=32,
        queue_size=96,  # a multiple of the batch sizes 16, 24, 32, 48 (the original enqueue needs it)
    )


def base_config(image_size: int = 224) -> BlipConfig:
    """BLIP with ViT-B/16 (the paper's base model)."""
    return BlipConfig(vision=VisionConfig(image_size=image_size))


def large_config(image_size: int = 224) -> BlipConfig:
    """BLIP with ViT-L/16 (drop-path 0.1 as the original ``create_vit``)."""
    return BlipConfig(
        vision=VisionConfig(image_size=image_size, width=1024, depth=24, num_heads=16, drop_path_rate=0.1)
    )


PRESETS = {"tiny": tiny_config, "base": base_config, "large": large_config}


def preset(name: str, **kwargs) -> BlipConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name](**kwargs)


# ---------------------------------------------------------------- plain data <-> config


# Speed settings that configs stored by earlier versions carry beside the architecture: the op backend, which now
# comes only from train.impl / BLIP_FAST_IMPL, and nothing else read them. Dropped where a stored config is read.
STORED_SPEED_KEYS = ("impl",)


def architecture(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored BlipConfig dict (a checkpoint's) without the speed settings older files also stored."""
    return {k: v for k, v in stored.items() if k not in STORED_SPEED_KEYS} if isinstance(stored, dict) else stored


def config_to_dict(config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(cls, data: dict[str, Any], where: str = ""):
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types are a ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__} must be a mapping; got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) in {where or cls.__name__}: {', '.join(unknown)}; "
                          f"known: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        values[name] = _coerce(hints[name], value, key)
    try:
        return cls(**values)
    except TypeError as error:  # a required field missing
        raise ConfigError(f"{where or cls.__name__}: {error}") from None


def _coerce(hint, value, key: str):
    if dataclasses.is_dataclass(hint):
        return config_from_dict(hint, value, key)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        kinds = [option for option in options if option is not type(None)]
        if len(kinds) > 1:  # e.g. bool | str: the first the value is
            for kind in kinds:
                try:
                    return _coerce(kind, value, key)
                except ConfigError:
                    continue
            names = " or ".join(getattr(kind, "__name__", str(kind)) for kind in kinds)
            raise ConfigError(f"{key} must be {names}; got {value!r} ({type(value).__name__})")
        hint = kinds[0]
    if origin in (list, tuple) and typing.get_args(hint):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list; got {value!r} ({type(value).__name__})")
        item = typing.get_args(hint)[0]
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict and not isinstance(value, dict):
        raise ConfigError(f"{key} must be a mapping; got {value!r} ({type(value).__name__})")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        # no setting means NaN or infinity, and NaN passes every range check written as `x <= 0`
        raise ConfigError(f"{key} must be a finite number; got {value}")
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not
                                                 (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{key} must be {hint.__name__}; got {value!r} ({type(value).__name__})")
    return value
