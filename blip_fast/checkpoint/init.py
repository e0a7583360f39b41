"""Initialising a BLIP model from the files the original recipe starts from: a timm/DeiT ViT and Hugging Face's BERT.

The original pretraining (``models/blip_pretrain.py``) starts its ViT-B from DeiT-B
(``deit_base_patch16_224-b5f2ef4d.pth``, loaded with ``strict=False``) and its ViT-L from timm's ImageNet-21k
ViT-L/16 (a JAX ``.npz``); its text encoder and decoder from ``bert-base-uncased`` (``BertModel.from_pretrained(...,
add_pooling_layer=False)``, ``BertLMHeadModel.from_pretrained``), both resized to the tokenizer's 30,524 tokens; it
then ties the decoder to the encoder in all but self-attention and copies the online encoders into their momentum
twins. :func:`init_vision` and :func:`init_text` do the same to a built model, from local files only:

- the ViT file's names are timm's, which are ours; its classifier (``head``) and anything else our ViT lacks are
  reported as unexpected. Position embeddings of another grid are resampled bicubically, as the original's
  ``interpolate_pos_embed`` does (:func:`~blip_fast.models.vit.position_embedding_for`); the original's pretraining
  loads DeiT at DeiT's own 224 px only. A JAX ``.npz`` is converted to timm's names as timm's ``_load_weights`` does.
- BERT goes into every text transformer of the model and into each decoder's MLM head (``cls.predictions``, which
  ``BertLMHeadModel.from_pretrained`` loads from BERT's). Cross-attention, which BERT lacks, keeps the model's own
  init, as do the word-embedding rows of [DEC] and [ENC]: the model drew them from N(0, initializer_range), the
  draw transformers 4.15's ``resize_token_embeddings`` made (BERT's ``_init_weights``). The LM bias gets 0 there, as
  4.15's ``tie_weights`` padded it. Pretraining's decoder shares all but its self-attention with the encoder
  (:func:`~blip_fast.models.med.share_all_but_self_attention`): written in place, those tensors stay shared.

Whatever a file lacks keeps the model's own init and is reported as missing. Everything is checked before anything
is written, so a file that does not fit leaves the model as it was. Momentum twins are copied from the initialised
online modules afterwards, as the original's ``copy_params``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..models.med import TextDecoder, TextTransformer
from ..models.vit import VisionTransformer, position_embedding_for
from .io import CheckpointError, load_torch
from .state import _check_finite, check_tensors

# the weights file of a Hugging Face (or timm hub) folder, in the order transformers prefers them
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")
# tensors with a row per token: a vocabulary smaller than the model's fills their first rows
VOCABULARY_TENSOR = re.compile(r"(word_embeddings\.weight|cls\.predictions\.(bias|decoder\.weight|decoder\.bias))$")
# the LM bias, whose rows for new tokens start at 0
LM_BIAS = re.compile(r"cls\.predictions\.(bias|decoder\.bias)$")
# config.json's name of each size of our TextConfig a BERT must have
BERT_SIZES = {"hidden_size": "hidden_size", "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
              "intermediate_size": "intermediate_size", "max_position_embeddings": "max_position_embeddings"}


@dataclass
class InitReport:
    """What an init call wrote: ``loaded`` maps each model tensor set from the file (by its first name; shared
    tensors once) to the file's tensor; ``missing`` the model tensors of the initialised modules the file lacks,
    left at the model's own init (``key[a:b]``: those rows only); ``unexpected`` the file's tensors not used."""

    part: str
    source: Path
    into: list[str]
    loaded: dict[str, str]
    missing: list[str]
    unexpected: list[str]
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """Three log lines: what was loaded where (and resampled, shared, copied), what is missing, what unused."""
        summary = f"{self.part} init from {self.source}: {len(self.loaded)} tensors into {', '.join(self.into)}"
        return ["; ".join([summary, *self.notes]),
                f"  missing (left at the model's own init): {abbreviate(self.missing)}",
                f"  unexpected (in the file, not used): {abbreviate(self.unexpected)}"]


def abbreviate(keys: list[str], groups_shown: int = 8) -> str:
    """``keys`` on one line: keys that differ only in their block or layer index, and the tensors of one module, as
    one pattern (``text_encoder.encoder.layer.*.crossattention.* (32 tensors, * = 0-1)``)."""
    if not keys:
        return "none"
    groups: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for key in keys:
        parts = key.split(".")
        numbered = [i for i, part in enumerate(parts) if part.isdigit()]
        # up to the module after the last index (a layer's crossattention), else up to the tensor's own module
        stem = parts[:numbered[-1] + 2] if numbered else parts[:-1]
        pattern = ".".join("*" if part.isdigit() else part for part in stem)
        if not stem:  # a top-level tensor (temp)
            pattern = key
        elif len(stem) < len(parts):
            pattern += ".*"
        groups.setdefault(pattern, []).append((key, tuple(int(parts[i]) for i in numbered)))
    shown = []
    for pattern, members in list(groups.items())[:groups_shown]:
        if len(members) == 1:
            shown.append(members[0][0])
            continue
        indices = [index for _, index in members]
        spans = "".join(f", * = {_span(sorted({index[i] for index in indices}))}" for i in range(len(indices[0])))
        shown.append(f"{pattern} ({len(members)} tensors{spans})")
    rest = list(groups.values())[groups_shown:]
    if rest:
        shown.append(f"... and {len(rest)} more groups ({sum(map(len, rest))} tensors)")
    return ", ".join(shown)


def _span(values: list[int]) -> str:
    contiguous = values == list(range(values[0], values[-1] + 1))
    return f"{values[0]}-{values[-1]}" if contiguous and len(values) > 2 else ",".join(map(str, values))


# ---------------------------------------------------------------- reading


def weights_file(folder: Path) -> Path:
    """The weights of a Hugging Face or timm hub folder."""
    for name in WEIGHTS_FILES:
        if (folder / name).is_file():
            return folder / name
    sharded = " (sharded weights, model.safetensors.index.json, are not read here)" if (
        folder / "model.safetensors.index.json").is_file() else ""
    raise CheckpointError(f"{folder} has no {' or '.join(WEIGHTS_FILES)}{sharded}")


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a ``.safetensors`` file, or of a torch file holding ``{'model': state}`` (DeiT's),
    ``{'state_dict': state}`` (timm's training checkpoints) or the bare state dict; loaded weights-only."""
    if path.suffix == ".safetensors":
        try:
            state = load_file(path)
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"cannot read {path}: {error}. The file may be truncated.") from None
    else:
        content = load_torch(path)
        state = next((content[key] for key in ("model", "state_dict")
                      if isinstance(content, dict) and isinstance(content.get(key), dict)), content)
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict")
    check_tensors(state, str(path))
    return state


def read_jax_vit(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A JAX ViT ``.npz`` (Google's ``vit_jax`` / AugReg checkpoints, timm's ImageNet-21k ViT-L/16) in timm's names,
    converted as timm's ``_load_weights`` does, and the names of the arrays with no timm counterpart (the
    classifier, the pre-logits). ``allow_pickle=False``: an archive of Python objects is refused, not run."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except Exception as error:  # numpy fails on a non-archive with many types (ValueError, OSError, BadZipFile, ...)
        raise CheckpointError(f"cannot read {path} as a JAX .npz checkpoint: {error}") from None
    prefix = "opt/target/" if "opt/target/embedding/kernel" in arrays else ""

    def same(array):
        return array

    def linear(kernel):  # Flax Dense kernels are (in, out), torch's weights (out, in)
        return kernel.T

    # (timm name, the arrays it is made of, how); attention kernels are (width, heads, head_dim) per projection and
    # (heads, head_dim, width) for the output, flattened to torch's (out, in)
    rules = [("patch_embed.proj.weight", ["embedding/kernel"], lambda k: k.permute(3, 2, 0, 1)),  # HWIO -> OIHW
             ("patch_embed.proj.bias", ["embedding/bias"], same), ("cls_token", ["cls"], same),
             ("pos_embed", ["Transformer/posembed_input/pos_embedding"], same),
             ("norm.weight", ["Transformer/encoder_norm/scale"], same),
             ("norm.bias", ["Transformer/encoder_norm/bias"], same)]
    blocks = sorted({int(m.group(1)) for name in arrays
                     if (m := re.match(rf"{re.escape(prefix)}Transformer/encoderblock_(\d+)/", name))})
    for i in blocks:
        block = f"Transformer/encoderblock_{i}/"
        attention = block + "MultiHeadDotProductAttention_1/"
        rules += [(f"blocks.{i}.norm1.weight", [block + "LayerNorm_0/scale"], same),
                  (f"blocks.{i}.norm1.bias", [block + "LayerNorm_0/bias"], same),
                  (f"blocks.{i}.attn.qkv.weight", [f"{attention}{n}/kernel" for n in ("query", "key", "value")],
                   lambda *kernels: torch.cat([k.flatten(1).T for k in kernels])),
                  (f"blocks.{i}.attn.qkv.bias", [f"{attention}{n}/bias" for n in ("query", "key", "value")],
                   lambda *biases: torch.cat([b.flatten() for b in biases])),
                  (f"blocks.{i}.attn.proj.weight", [attention + "out/kernel"], lambda k: k.flatten(0, 1).T),
                  (f"blocks.{i}.attn.proj.bias", [attention + "out/bias"], same),
                  (f"blocks.{i}.norm2.weight", [block + "LayerNorm_2/scale"], same),
                  (f"blocks.{i}.norm2.bias", [block + "LayerNorm_2/bias"], same)]
        rules += [(f"blocks.{i}.mlp.fc{r + 1}.{kind}", [f"{block}MlpBlock_3/Dense_{r}/{jax}"], convert)
                  for r in range(2) for kind, jax, convert in (("weight", "kernel", linear), ("bias", "bias", same))]
    state, used = {}, set()
    for name, sources, convert in rules:
        if all(prefix + source in arrays for source in sources):
            # a copy: tensors sharing the archive's buffers would keep them alive
            state[name] = convert(*(torch.from_numpy(np.array(arrays[prefix + s])) for s in sources)).contiguous()
            used.update(prefix + source for source in sources)
    return state, [name for name in arrays if name not in used]


def read_bert_config(folder: Path) -> dict:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{folder} is not a Hugging Face BERT folder: no config.json")
    try:
        config = json.loads(config_file.read_text())
    except (ValueError, OSError) as error:
        raise CheckpointError(f"{config_file} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file} is not a JSON object but a {type(config).__name__}")
    if config.get("model_type") != "bert":
        raise CheckpointError(f"{folder} holds a {config.get('model_type')!r} model, not BERT (config.json "
                              "model_type 'bert', as bert-base-uncased)")
    return config


def bert_name(key: str) -> str:
    """The name ``BertModel`` gives a tensor of a BERT checkpoint's: without the ``bert.`` of ``BertForPreTraining``
    and ``BertLMHeadModel`` files, with the LayerNorm names of today's transformers for the ``gamma``/``beta`` of
    older files (bert-base-uncased's ``pytorch_model.bin``), which transformers renames on loading."""
    key = key.removeprefix("bert.")
    return re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", key))


# ---------------------------------------------------------------- initialising


def init_vision(model: nn.Module, path: str | Path) -> InitReport:
    """Load the timm/DeiT ViT of ``path`` into ``model.visual_encoder``: a torch file (``.pth``/``.bin``, DeiT's
    ``{'model': state}`` or a bare state dict), ``.safetensors``, a JAX ``.npz``, or a timm hub folder holding
    ``model.safetensors`` or ``pytorch_model.bin``. Position embeddings of another grid are resampled bicubically.

    A file that does not fit the model's ViT (another width, depth or patch size) is a :class:`CheckpointError`
    naming the file and the first mismatches.
    """
    vit = getattr(model, "visual_encoder", None)
    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"{type(model).__name__} has no visual_encoder ViT to initialise")
    path = Path(path)
    file = _existing(path)
    state, unconverted = read_jax_vit(file) if file.suffix == ".npz" else (read_state(file), [])
    source = str(path)
    if "dist_token" in state:
        raise CheckpointError(f"{source} is a distilled DeiT (a dist_token and its position embedding), which "
                              "BLIP's ViT has not: use a DeiT without distillation, as deit_base_patch16_224")
    own = vit.state_dict()
    if not any(key in own for key in state):
        raise CheckpointError(f"{source} holds no ViT weights under timm's names (patch_embed.proj.weight, pos_embed, "
                              f"blocks.N..., as DeiT and timm name them); it holds {abbreviate(list(state))}")
    blocks = {int(m.group(1)) for key in state if (m := re.match(r"blocks\.(\d+)\.", key))}
    if blocks != set(range(vit.config.depth)):
        raise CheckpointError(f"{source} holds blocks {_span(sorted(blocks)) if blocks else 'none'}, but the model's "
                              f"ViT has {vit.config.depth} (blocks 0-{vit.config.depth - 1})")
    notes = []
    if "pos_embed" in state and state["pos_embed"].dim() == 3:
        side = vit.config.image_size // vit.config.patch_size
        try:
            resampled = position_embedding_for(state["pos_embed"], (side, side))
        except ValueError as error:
            raise CheckpointError(f"{source}: {error} after the [CLS] token") from None
        if resampled is not state["pos_embed"]:
            held = round((state["pos_embed"].shape[1] - 1) ** 0.5)
            notes.append(f"pos_embed resampled {held}x{held} -> {side}x{side} (bicubic)")
            state = {**state, "pos_embed": resampled.contiguous()}
    plan = {f"visual_encoder.{key}": key for key in own if key in state}
    scope = [f"visual_encoder.{key}" for key in own]
    loaded, missing, _ = _load(model, scope, plan, state, source)
    notes += _copy_momentum_twins(model)
    unexpected = [key for key in state if key not in set(plan.values())] + unconverted
    return InitReport("vision", path, ["visual_encoder"], loaded, missing, unexpected, notes)


def init_text(model: nn.Module, folder: str | Path) -> InitReport:
    """Load a Hugging Face BERT folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``, as
    ``bert-base-uncased``) into every text transformer of ``model`` and each decoder's MLM head, as the original
    pretraining's ``from_pretrained`` + ``resize_token_embeddings`` do (see the module docstring).

    A folder that is not BERT's, or whose BERT has another shape than the model's text transformer (hidden size,
    layers, heads, feed-forward width, positions; a larger vocabulary), is a :class:`CheckpointError`.
    """
    twins = {id(twin) for _, twin in _momentum_pairs(model)}
    transformers = [(name, module) for name, module in model.named_modules()
                    if isinstance(module, TextTransformer) and id(module) not in twins]
    decoders = [(name, module) for name, module in model.named_modules() if isinstance(module, TextDecoder)]
    if not transformers:
        raise TypeError(f"{type(model).__name__} has no text transformer to initialise")
    folder = Path(folder)
    if not folder.exists():
        raise CheckpointError(f"BERT folder not found: {folder}")
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is a file; init_text takes a Hugging Face BERT folder (config.json + "
                              f"{' or '.join(WEIGHTS_FILES)}, as bert-base-uncased)")
    config = read_bert_config(folder)
    for _, module in transformers:
        _check_bert_fits(config, module, str(folder))
    file = weights_file(folder)
    held = read_state(file)
    by_name: dict[str, str] = {}  # BertModel's name of each tensor -> the file's
    for key in held:
        name = bert_name(key)
        if name in by_name:
            raise CheckpointError(f"{file} holds {name} twice, as {by_name[name]} and {key}")
        by_name[name] = key
    layers = {int(m.group(1)) for name in by_name if (m := re.match(r"encoder\.layer\.(\d+)\.", name))}
    wanted = transformers[0][1].config.num_layers
    if layers != set(range(wanted)):
        raise CheckpointError(f"{file} holds encoder layers {_span(sorted(layers)) if layers else 'none'}, but the "
                              f"model's text transformer has {wanted} (config.json says "
                              f"{config.get('num_hidden_layers')})")
    plan, scope = {}, set()
    for prefix, module in transformers:
        plan |= {f"{prefix}.{key}": by_name[key] for key in module.state_dict() if key in by_name}
        scope |= {f"{prefix}.{key}" for key in module.state_dict()}
    for prefix, decoder in decoders:
        plan |= {f"{prefix}.cls.{key}": by_name[f"cls.{key}"] for key in decoder.cls.state_dict()
                 if f"cls.{key}" in by_name}
        scope |= {f"{prefix}.cls.{key}" for key in decoder.cls.state_dict()}
    ordered_scope = [key for key in model.state_dict() if key in scope]
    loaded, missing, resized = _load(model, ordered_scope, plan, held, str(file))
    std = transformers[0][1].config.initializer_range
    notes = [f"vocabulary {rows} -> {total} tokens (new word-embedding rows keep the model's N(0, {std}) init, new "
             "LM-bias entries 0)" for rows, total in sorted(set(resized))]
    notes += _sharing_notes(transformers) + _copy_momentum_twins(model)
    into = [prefix for prefix, _ in transformers] + [f"{prefix}.cls" for prefix, _ in decoders]
    used = set(plan.values())
    unexpected = [key for key in held if key not in used]
    return InitReport("text", folder, into, loaded, missing, unexpected, notes)


def _existing(path: Path) -> Path:
    """The weights file ``path`` names: itself, or a hub folder's."""
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    return weights_file(path) if path.is_dir() else path


def _check_bert_fits(config: dict, transformer: TextTransformer, folder: str) -> None:
    text = transformer.config
    wrong = [f"{name} {config.get(name)} (the model's {getattr(text, ours)})" for name, ours in BERT_SIZES.items()
             if config.get(name) != getattr(text, ours)]
    if config.get("hidden_act", "gelu") != "gelu":
        wrong.append(f"hidden_act {config['hidden_act']!r} (the model's 'gelu')")
    vocab = config.get("vocab_size")
    if not isinstance(vocab, int) or not 0 < vocab <= text.vocab_size:
        wrong.append(f"vocab_size {vocab} (the model's {text.vocab_size}: BERT's tokens and BLIP's added ones)")
    if wrong:
        raise CheckpointError(f"{folder} does not fit the model's text transformer: {'; '.join(wrong)}")


def _load(model: nn.Module, scope: list[str], plan: dict[str, str], state: dict[str, torch.Tensor],
          source: str) -> tuple[dict[str, str], list[str], list[tuple[int, int]]]:
    """Copy ``state[plan[key]]`` into the model's tensor of each ``scope`` key, each tensor once (shared modules and
    tied weights have several names). Every tensor is checked before any is written.

    Returns the tensors loaded (first name -> state key), those the state lacks, and the (file rows, model rows) of
    vocabulary tensors the file fills in part: their other rows keep the model's init, the LM bias's become 0."""
    tensors = model.state_dict(keep_vars=True)
    names: dict[int, list[str]] = {}
    for key in scope:
        names.setdefault(id(tensors[key]), []).append(key)
    writes, missing, problems = [], [], []
    for keys in names.values():
        target = tensors[keys[0]]
        sources = list(dict.fromkeys(plan[key] for key in keys if key in plan))
        if not sources:
            missing.append(keys[0])
            continue
        value = state[sources[0]]
        if any(not torch.equal(value, state[other]) for other in sources[1:]):
            problems.append(f"{' and '.join(sources)} differ, but the model ties them (one tensor: {keys[0]})")
        elif target.is_floating_point() and not value.is_floating_point():
            problems.append(f"{sources[0]}: {value.dtype} values for a floating-point weight")
        elif value.shape == target.shape:
            writes.append((keys, sources[0], target, None))
        elif (any(VOCABULARY_TENSOR.search(key) for key in keys) and value.dim() == target.dim()
              and value.shape[1:] == target.shape[1:] and value.shape[0] < target.shape[0]):
            writes.append((keys, sources[0], target, value.shape[0]))
        else:
            problems.append(f"{sources[0]}: file {tuple(value.shape)} vs model {tuple(target.shape)} ({keys[0]})")
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise CheckpointError(f"{source} does not fit the model:\n  " + "\n  ".join(problems[:10]) + more)
    _check_finite({key: state[key] for _, key, _, _ in writes}, source)
    loaded, resized = {}, []
    with torch.no_grad():
        for keys, key, target, rows in writes:
            loaded[keys[0]] = key
            if rows is None:
                target.copy_(state[key])
                continue
            target[:rows].copy_(state[key])
            resized.append((rows, target.shape[0]))
            if any(LM_BIAS.search(name) for name in keys):
                target[rows:].zero_()
            else:
                missing.append(f"{keys[0]}[{rows}:{target.shape[0]}]")
    return loaded, missing, resized


def _momentum_pairs(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    return model.momentum_pairs() if hasattr(model, "momentum_pairs") else []


def _copy_momentum_twins(model: nn.Module) -> list[str]:
    """Copy every online module of ``model`` into its momentum twin (the original ``copy_params``); the report's
    note saying so, if it has twins."""
    pairs = _momentum_pairs(model)
    if not pairs:
        return []
    with torch.no_grad():
        for online, twin in pairs:
            for param, param_m in zip(online.parameters(), twin.parameters(), strict=True):
                param_m.copy_(param)
    names = {id(module): name for name, module in model.named_modules()}
    return [f"momentum copies taken ({', '.join(names[id(twin)] for _, twin in pairs)})"]


def _sharing_notes(transformers: list[tuple[str, TextTransformer]]) -> list[str]:
    """Which text transformer shares which of its tensors with another (pretraining's decoder with the encoder)."""
    notes = []
    for i, (name, module) in enumerate(transformers):
        for earlier, other in transformers[:i]:
            theirs = {id(tensor) for tensor in other.state_dict(keep_vars=True).values()}
            own = [f"{name}.{key}" for key, tensor in module.state_dict(keep_vars=True).items()
                   if id(tensor) not in theirs]
            if len(own) < len(module.state_dict()):
                notes.append(f"{name} shares all but {abbreviate(own)} with {earlier}")
    return notes
