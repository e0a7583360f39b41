"""Hugging Face ``transformers`` BLIP directories: ``config.json`` + safetensors weights.

``BlipForImageTextRetrieval`` <-> retrieval, ``BlipForConditionalGeneration`` <-> caption,
``BlipForQuestionAnswering`` <-> vqa. The text side uses the original (BERT) names in both; the
vision side is renamed (``vision_model.encoder.layers.N.self_attn.qkv`` <->
``visual_encoder.blocks.N.attn.qkv`` ...). Hugging Face keeps no temperature, momentum encoders
or queues: those are dropped on save and start fresh on load. The tied LM head is stored once
(a config with ``tie_word_embeddings`` false is refused: our LM head is the word embeddings).
Reading needs only ``safetensors``; ``transformers`` itself is not imported. A save writes the
weights in full before either file is replaced, so a failed write leaves the old checkpoint as it was.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import LARGEST_SIZE, BlipConfig, ConfigError, TextConfig, VisionConfig
from ..models import build_model
from .io import CheckpointError, atomic_write, load_torch, new_file_mode
from .state import check_config_fits, check_tensors, load_state, resize_position_embeddings

ARCHITECTURES = {
    "BlipForImageTextRetrieval": "retrieval",
    "BlipForConditionalGeneration": "caption",
    "BlipForQuestionAnswering": "vqa",
}
TASK_ARCHITECTURE = {task: arch for arch, task in ARCHITECTURES.items()}

# (ours, Hugging Face) name prefixes, {n} standing for a block index; text and heads keep their names.
_VISION_NAMES = [
    ("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("visual_encoder.patch_embed.proj.", "vision_model.embeddings.patch_embedding."),
    ("visual_encoder.norm.", "vision_model.post_layernorm."),
    ("visual_encoder.blocks.{n}.norm1.", "vision_model.encoder.layers.{n}.layer_norm1."),
    ("visual_encoder.blocks.{n}.norm2.", "vision_model.encoder.layers.{n}.layer_norm2."),
    ("visual_encoder.blocks.{n}.attn.qkv.", "vision_model.encoder.layers.{n}.self_attn.qkv."),
    ("visual_encoder.blocks.{n}.attn.proj.", "vision_model.encoder.layers.{n}.self_attn.projection."),
    ("visual_encoder.blocks.{n}.mlp.", "vision_model.encoder.layers.{n}.mlp."),
]
_HF_ONLY_TIED = ("text_decoder.cls.predictions.decoder.weight", "text_decoder.cls.predictions.decoder.bias")
_NOT_IN_HF = re.compile(r"^(temp|image_queue|text_queue|idx_queue|ptr_queue|queue_ptr|\w+_m\..*)$")


def _rename(key: str, source: int) -> str:
    for names in _VISION_NAMES:
        pattern = re.escape(names[source]).replace(re.escape("{n}"), r"(\d+)")
        match = re.match(pattern, key)
        if match:
            target = names[1 - source]
            if match.groups():
                target = target.replace("{n}", match.group(1))
            return target + key[match.end():]
    return key


def to_hf_key(key: str) -> str:
    return _rename(key, source=0)


def from_hf_key(key: str) -> str:
    return _rename(key, source=1)


def hf_config_dict(config: BlipConfig, task: str) -> dict:
    vision, text = config.vision, config.text
    return {
        "architectures": [TASK_ARCHITECTURE[task]],
        "model_type": "blip",
        "image_text_hidden_size": config.embed_dim,
        "label_smoothing": config.label_smoothing,
        "vision_config": {
            "model_type": "blip_vision_model", "hidden_size": vision.width,
            "intermediate_size": round(vision.width * vision.mlp_ratio), "num_hidden_layers": vision.depth,
            "num_attention_heads": vision.num_heads, "image_size": vision.image_size,
            "patch_size": vision.patch_size, "layer_norm_eps": vision.layer_norm_eps, "hidden_act": "gelu",
        },
        "text_config": {
            "model_type": "blip_text_model", "vocab_size": text.vocab_size, "hidden_size": text.hidden_size,
            "encoder_hidden_size": vision.width, "intermediate_size": text.intermediate_size,
            "num_hidden_layers": text.num_layers, "num_attention_heads": text.num_heads,
            "max_position_embeddings": text.max_position_embeddings, "layer_norm_eps": text.layer_norm_eps,
            "hidden_dropout_prob": text.hidden_dropout, "attention_probs_dropout_prob": text.attention_dropout,
            "initializer_range": text.initializer_range, "hidden_act": "gelu", "bos_token_id": text.bos_token_id,
            "pad_token_id": text.pad_token_id, "sep_token_id": text.sep_token_id,
            "label_smoothing": config.label_smoothing,
        },
    }


# config.json values read, by section: those that must be integers (a float size would fail deep inside
# torch.nn) from 0 to LARGEST_SIZE (a longer one overflows the float arithmetic of config_from_hf), and those that must
# be numbers
_HF_INTS = {
    "": ("image_text_hidden_size",),
    "vision_config": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                      "patch_size"),
    "text_config": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "max_position_embeddings", "pad_token_id", "sep_token_id", "bos_token_id"),
}
_HF_FLOATS = {
    "": ("label_smoothing",),
    "vision_config": ("layer_norm_eps",),
    "text_config": ("layer_norm_eps", "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range",
                    "label_smoothing"),
}


def _check_hf_values(data: dict) -> None:
    """Refuse values of the wrong type by their config.json name, before they reach the model."""
    for section in ("vision_config", "text_config"):
        if section in data and not isinstance(data[section], dict):
            raise CheckpointError(f"Hugging Face BLIP config.json: {section} is not an object but a "
                                  f"{type(data[section]).__name__}")
    for section, ints in _HF_INTS.items():
        values = data.get(section, {}) if section else data
        for key in ints + _HF_FLOATS[section]:
            value = values.get(key)
            numbers = (int,) if key in ints else (int, float)
            if key in values and (not isinstance(value, numbers) or isinstance(value, bool)
                                  or key in ints and not 0 <= value <= LARGEST_SIZE):
                name = f"{section}.{key}" if section else key
                kind = "an integer from 0 to 2**63 - 1" if key in ints else "a number"
                raise CheckpointError(f"Hugging Face BLIP config.json: {name} must be {kind}; got {value!r}")
    # transformers unties the LM head from the word embeddings when this is false; ours is one tensor
    for section in ("", "text_config"):
        values = data.get(section, {}) if section else data
        if values.get("tie_word_embeddings", True) is False:
            name = f"{section}.tie_word_embeddings" if section else "tie_word_embeddings"
            raise CheckpointError(f"Hugging Face BLIP config.json has {name} false: an LM head apart from the "
                                  "word embeddings, which blip_fast (as the original BLIP) cannot hold")


def config_from_hf(data: dict) -> BlipConfig:
    _check_hf_values(data)
    try:
        v, t = data["vision_config"], data["text_config"]
        vision = VisionConfig(
            image_size=v.get("image_size", 384), patch_size=v.get("patch_size", 16), width=v["hidden_size"],
            depth=v["num_hidden_layers"], num_heads=v["num_attention_heads"],
            mlp_ratio=v.get("intermediate_size", 4 * v["hidden_size"]) / v["hidden_size"],  # vit.Block rounds it back
            layer_norm_eps=v.get("layer_norm_eps", 1e-5),
        )
        text = TextConfig(
            vocab_size=t.get("vocab_size", 30524), hidden_size=t["hidden_size"], num_layers=t["num_hidden_layers"],
            num_heads=t["num_attention_heads"], intermediate_size=t["intermediate_size"],
            max_position_embeddings=t.get("max_position_embeddings", 512),
            layer_norm_eps=t.get("layer_norm_eps", 1e-12), hidden_dropout=t.get("hidden_dropout_prob", 0.0),
            attention_dropout=t.get("attention_probs_dropout_prob", 0.0),
            initializer_range=t.get("initializer_range", 0.02), pad_token_id=t.get("pad_token_id", 0),
            sep_token_id=t.get("sep_token_id", 102), bos_token_id=t.get("bos_token_id", 30522),
        )
    except (KeyError, TypeError, ZeroDivisionError) as error:
        raise CheckpointError(f"Hugging Face BLIP config.json lacks or garbles {error}") from None
    for key, act in (("vision", v.get("hidden_act", "gelu")), ("text", t.get("hidden_act", "gelu"))):
        if act != "gelu":
            raise CheckpointError(f"{key} hidden_act {act!r} is not supported (BLIP uses exact gelu)")
    return BlipConfig(vision=vision, text=text, embed_dim=data.get("image_text_hidden_size", 256),
                      label_smoothing=t.get("label_smoothing", data.get("label_smoothing", 0.1)))


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    try:
        if single.is_file():
            return load_file(single)
        if index.is_file():
            state = {}
            for shard in _index_shards(directory, index):
                state.update(load_file(shard))
            return state
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"cannot read the weights in {directory}: {error}. A file may be truncated.") from None
    bin_file = directory / "pytorch_model.bin"
    if bin_file.is_file():
        weights = load_torch(bin_file)
        if not isinstance(weights, dict):
            raise CheckpointError(f"{bin_file} is not a state dict but a {type(weights).__name__}")
        check_tensors(weights, str(bin_file))
        return weights
    raise CheckpointError(f"{directory} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _index_shards(directory: Path, index: Path) -> list[Path]:
    """The shard files a safetensors index names, each a file listed in ``directory``.

    The index is data from the download: an entry may name ``../x.safetensors`` or ``/dev/zero``. The folder a shard
    is listed in must resolve into ``directory``; the shard itself may be a link out of it, as every file of the
    Hugging Face cache is (``snapshots/<commit>/x`` -> ``../../blobs/<hash>``), if it leads to a regular file.
    """
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:  # ValueError: not JSON; TypeError: not an object
        raise CheckpointError(f"cannot read the weights in {directory}: {error}. A file may be truncated.") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: weight_map is not an object of weight name -> shard file")
    root = directory.resolve()
    shards = []
    for name in sorted(set(weight_map.values())):
        entry = next(key for key, value in weight_map.items() if value == name)
        shard = directory / name
        if not shard.parent.resolve().is_relative_to(root):
            raise CheckpointError(f"{index}: weight_map entry {entry!r} names {name!r}, a file outside {directory}")
        if not shard.is_file():
            raise CheckpointError(f"{index}: weight_map entry {entry!r} names {name!r}, which is not a file in "
                                  f"{directory}")
        shards.append(shard)
    return shards


def read_hf(directory: str | Path) -> tuple[str, BlipConfig, dict[str, torch.Tensor]]:
    """(task, config, state dict in our key layout) of a Hugging Face BLIP directory."""
    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{directory} is not a Hugging Face model directory: no config.json")
    try:
        data = json.loads(config_file.read_text())
    except ValueError as error:  # not JSON, not UTF-8, or an integer of more digits than int() takes
        raise CheckpointError(f"{config_file} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{config_file} is not a JSON object but a {type(data).__name__}")
    architectures = data.get("architectures") or []
    if not isinstance(architectures, list):  # a garbled value is reported below, not iterated
        architectures = [architectures]
    tasks = [ARCHITECTURES[a] for a in architectures if isinstance(a, str) and a in ARCHITECTURES]
    if data.get("model_type") != "blip" or not tasks:
        raise CheckpointError(f"{directory} holds {architectures or data.get('model_type')!r}, not one of "
                              f"{', '.join(ARCHITECTURES)}")
    try:  # before the weights: a bad config.json fails without reading gigabytes
        config = config_from_hf(data)
    except (ConfigError, CheckpointError) as error:
        raise CheckpointError(f"{config_file}: {error}") from None
    state = {from_hf_key(k): v for k, v in _read_weights(directory).items()}
    for tied, source in zip(_HF_ONLY_TIED, ("text_decoder.bert.embeddings.word_embeddings.weight",
                                            "text_decoder.cls.predictions.bias"), strict=True):
        if tied not in state and source in state:
            state[tied] = state[source]
    return tasks[0], config, state


def load_hf(directory: str | Path, task: str | None = None, image_size: int | None = None) -> nn.Module:
    """Build and load the model of a Hugging Face BLIP directory (``image_size`` resamples the
    position embeddings)."""
    held, config, state = read_hf(directory)
    if task is not None and task != held:
        raise CheckpointError(f"{directory} holds a {held} model ({TASK_ARCHITECTURE[held]}), not {task}")
    check_config_fits(config, state, held, str(directory))
    if image_size is not None and image_size != config.vision.image_size:
        config.vision = VisionConfig(**{**config.vision.__dict__, "image_size": image_size})
        resize_position_embeddings(state, image_size, config.vision.patch_size)
    model = build_model(held, config)
    load_state(model, state, str(directory))
    return model.eval()


def save_hf(model: nn.Module, directory: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` that ``transformers`` loads.

    The weights are written in full under a staging name first and take their place only once
    ``config.json`` is in: a write that fails (a full disk) leaves the old pair whole and no temporary
    file. Other files of the directory (a tokenizer) are left as they are.
    """
    task = getattr(model, "task", None)
    if task not in TASK_ARCHITECTURE:
        raise CheckpointError(f"Hugging Face has no BLIP class for the {task} model; "
                              f"convert a {', '.join(TASK_ARCHITECTURE)} model")
    config = model.config
    if task == "vqa" and config.vision.width != config.text.hidden_size:
        # transformers builds the answer decoder's cross-attention with encoder_hidden_size = the ViT
        # width, where ours (as the original) attends to the question encoder's text-width states
        raise CheckpointError(f"transformers' BlipForQuestionAnswering cannot hold a VQA model whose vision width "
                              f"({config.vision.width}) differs from its text width ({config.text.hidden_size}); "
                              "save it in the Salesforce format")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"cannot write a Hugging Face directory at {directory}: it is a file")
    directory.mkdir(parents=True, exist_ok=True)
    state = {to_hf_key(k): v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()
             if not _NOT_IN_HF.match(k) and k not in _HF_ONLY_TIED}
    text = json.dumps(hf_config_dict(config, task), indent=2)
    weights = directory / "model.safetensors"
    staged = atomic_write(directory / ".model.safetensors.staged",
                          lambda temp: save_file(state, temp, metadata={"format": "pt"}))
    try:
        os.chmod(staged, new_file_mode(weights))  # the mode of the weights it replaces
        atomic_write(directory / "config.json", lambda temp: Path(temp).write_text(text))
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    os.replace(staged, weights)
    return directory
