"""Pretraining configuration: YAML files like the original ``configs/pretrain.yaml``, validated into dataclasses.

A run is described by one :class:`PretrainConfig`:

    preset: base                 # tiny | base | large: the model's architecture
    model: {queue_size: 57600}   # any BlipConfig field over the preset (nested: vision / text)
    data: {...}                  # DataConfig: where the pairs come from, batch size, image transform
    optim: {...}                 # OptimConfig: AdamW, the original's warm-up + per-epoch step decay
    train: {...}                 # TrainConfig: epochs, precision, compile, checkpoints, logging

``load_pretrain_config(path, overrides)`` reads a YAML file (or a shipped one by name: ``base``,
``large``, ``tiny-synthetic``) and applies ``key.sub=value`` overrides (values parsed as YAML).
Unknown keys and ill-typed values are a :class:`~blip_fast.config.ConfigError` that names the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import BlipConfig, ConfigError, config_from_dict, config_to_dict, preset
from ..data.transforms import TransformConfig
from .divergence import NONFINITE_MODES

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
SHIPPED = {"base": "pretrain_base.yaml", "large": "pretrain_large.yaml",
           "tiny-synthetic": "pretrain_tiny_synthetic.yaml",
           # fine-tuning (blip-fast finetune TASK): the original's configs of each task
           "retrieval_coco": "retrieval_coco.yaml", "retrieval_flickr": "retrieval_flickr.yaml",
           "caption_coco": "caption_coco.yaml", "vqa": "vqa.yaml", "nlvr": "nlvr.yaml"}
DEFAULT_CONFIG = "tiny-synthetic"


@dataclass
class DataConfig:
    kind: str = "synthetic"
    """``synthetic`` (the built-in scenes, written on first use), ``json`` (BLIP annotation lists) or ``shards``."""
    paths: list[str] = field(default_factory=list)
    """``json``: annotation files; ``shards``: tar files or brace patterns (``cc3m-{00000..00331}.tar``)."""
    image_root: str | None = None
    """Folder the ``image`` paths of JSON lists are relative to: the training lists' and the evaluation lists'
    (``eval_path``, ``val_path``). With ``shards``, which hold their images, it serves the evaluation lists only."""
    synthetic_dir: str | None = None
    """``synthetic``: where the dataset lives (default ``<out>/data``); written when missing."""
    synthetic_n: int = 8000
    """``synthetic``: scenes to write (90% train, 5% val, 5% test)."""
    synthetic_image_size: int = 64
    """``synthetic``: side of the drawn JPEGs."""
    eval_path: str | None = None
    """The evaluation split: for pretraining and retrieval a Karpathy-shape list (``caption`` is a list; pretraining's
    ``synthetic`` uses its test split when unset), for VQA the questions with their answers, for NLVR2 the
    statements with their labels."""
    val_path: str | None = None
    """The validation split (same shape as ``eval_path``): evaluated after every epoch, the best epoch's weights kept
    in ``<out>/best.pth`` and evaluated on ``eval_path`` at the end, as the original's fine-tuning scripts do."""
    vg_image_root: str | None = None
    """VQA: folder of the Visual Genome images that ``"dataset": "vg"`` entries name (``image_root`` holds COCO's)."""
    answer_list: str | None = None
    """VQA: the candidate answers (the original's ``answer_list.json``) that rank inference scores."""
    batch_size: int = 75
    """Pairs per step on each rank (the original: 75 per GPU)."""
    num_workers: int = 4
    """DataLoader workers per rank (decoding, transform, tokenization)."""
    backend: str = "auto"
    """Image transforms: ``pil``, ``dali`` or ``auto`` (DALI when installed)."""
    shuffle_buffer: int = 1000
    """Samples in the shuffle buffer of each shard reader."""
    max_words: int = 30
    """Words kept by the caption cleaning (the original ``pre_caption(caption, 30)``)."""
    transform: TransformConfig = field(default_factory=lambda: TransformConfig.pretrain(224))
    """The image transform (kind ``pretrain``: crop scale 0.2-1.0, flip, RandomAugment as the original)."""
    steps_per_epoch: int | None = None
    """Shards only: batches per epoch per rank, for the alpha ramp and ETA (lists know their length)."""

    def __post_init__(self):
        if self.kind not in ("synthetic", "json", "shards"):
            raise ConfigError(f"data.kind must be synthetic, json or shards; got {self.kind!r}")
        if self.kind != "synthetic" and not self.paths:
            raise ConfigError(f"data.kind {self.kind!r} needs data.paths (annotation files or shards)")
        if self.kind == "synthetic" and self.paths:  # else the run would train on synthetic scenes without a word
            raise ConfigError("data.paths is read with data.kind=json or data.kind=shards; this config has "
                              "data.kind=synthetic")
        if self.backend not in ("auto", "pil", "dali"):
            raise ConfigError(f"data.backend must be auto, pil or dali; got {self.backend!r}")
        for name in ("batch_size", "synthetic_n", "synthetic_image_size", "max_words", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be at least 1; got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ConfigError("data.batch_size must be at least 2 (ITM draws its negatives from the batch)")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0; got {self.num_workers}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ConfigError(f"data.steps_per_epoch must be positive; got {self.steps_per_epoch}")
        if self.kind == "shards" and self.image_root is not None and not (self.eval_path or self.val_path):
            raise ConfigError("data.image_root applies to JSON lists: tar shards hold their images, and no "
                              "data.eval_path or data.val_path is set for it to serve")


@dataclass
class OptimConfig:
    init_lr: float = 3e-4
    """Peak learning rate, reached at the end of warm-up; epoch e >= 1 uses ``init_lr * lr_decay_rate ** e``."""
    min_lr: float = 1e-6
    """Floor of the per-epoch decay."""
    warmup_lr: float = 1e-6
    """Learning rate of the first step."""
    warmup_steps: int = 3000
    """Linear warm-up length in optimizer steps, within the first epoch (as the original)."""
    lr_decay_rate: float = 0.9
    """Per-epoch step decay."""
    weight_decay: float = 0.05
    """AdamW weight decay."""
    decay_norms_and_biases: bool = True
    """The original decays every parameter; ``false`` exempts biases, norms and the temperature (LAVIS)."""
    temp_lr: float | None = None
    """Learning rate of the ITC temperature; ``null``: the schedule's, as the original."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas (torch's defaults, as the original)."""
    eps: float = 1e-8
    """Adam epsilon."""
    fused: str = "auto"
    """``auto`` (apex's FusedAdam when installed on CUDA, else torch's fused AdamW), ``torch``, ``apex``,
    ``foreach`` (multi-tensor, unfused) or ``loop`` (one parameter at a time, the reference)."""
    schedule: str = "step"
    """``step``: pretraining's per-epoch decay by ``lr_decay_rate``; ``cosine``: the fine-tuning scripts' per-epoch
    cosine from ``init_lr`` to ``min_lr`` over ``train.epochs`` (blip_fast.train.schedule)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step."""
    clip_grad_norm: float = 0.0
    """Clip the global gradient norm to this value; 0 turns clipping off (the original does not clip)."""

    def __post_init__(self):
        for name in ("init_lr", "warmup_lr", "eps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"optim.{name} must be positive; got {getattr(self, name)}")
        if self.min_lr < 0:  # the fine-tuning configs' cosine ends at 0
            raise ConfigError(f"optim.min_lr must be >= 0; got {self.min_lr}")
        if self.temp_lr is not None and self.temp_lr < 0:
            raise ConfigError(f"optim.temp_lr must be >= 0; got {self.temp_lr}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.clip_grad_norm < 0:
            raise ConfigError("optim.warmup_steps, weight_decay and clip_grad_norm must be >= 0")
        if not 0 < self.lr_decay_rate <= 1:
            raise ConfigError(f"optim.lr_decay_rate must be in (0, 1]; got {self.lr_decay_rate}")
        if self.grad_accum_steps < 1:
            raise ConfigError(f"optim.grad_accum_steps must be at least 1; got {self.grad_accum_steps}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1); got {self.betas}")
        if self.schedule not in ("step", "cosine"):
            raise ConfigError(f"optim.schedule must be step or cosine; got {self.schedule!r}")
        if self.fused not in ("auto", "torch", "apex", "foreach", "loop"):
            raise ConfigError(f"optim.fused must be auto, torch, apex, foreach or loop; got {self.fused!r}")


@dataclass
class TrainConfig:
    out: str = "runs/pretrain"
    """Run folder: checkpoints, metrics.jsonl, TensorBoard events, the resolved config."""
    epochs: int = 20
    """Passes over the data (the original: 20)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps in total (a checkpoint is written there)."""
    alpha_ramp_epochs: float = 2.0
    """Distillation weight ramped linearly from 0 over this many epochs (the original: 2)."""
    seed: int = 42
    """Seed of weights, data order, augmentation, dropout and hard negatives (the original: 42)."""
    precision: str = "fp32"
    """``fp32`` or ``bf16`` (autocast; weights, momentum copies and optimizer state stay fp32)."""
    compile: bool = False
    """``torch.compile`` each transformer block (short compile, no recompiles per caption length)."""
    cuda_graph: bool | str = "auto"
    """Replay the whole optimizer step as a CUDA graph (blip_fast.train.cuda_graph): ``true`` needs one CUDA process
    and torch's fused AdamW (an error otherwise); ``auto`` turns it on where, besides, it has been run on a GPU --
    a task that declares its step graphable (pretraining, retrieval), one micro-batch per step, no activation
    checkpointing -- and says why not on a GPU where it stays off; ``false`` never."""
    fp8_vit: bool = False
    """Run the ViT blocks' linear layers as FP8 matmuls (blip_fast.models.fp8: e4m3 forward, e5m2 gradients,
    per-tensor scales); a GPU of compute capability 8.9 or later. Off by default until ``benchmarks/bench_fp8.py``'s
    loss-curve check against bf16 has passed on a GPU."""
    pack_text: bool = True
    """Run the text passes on the captions' real tokens only, without their padding (blip_fast.models.packing):
    the same losses with fewer FLOPs. ``false``: every caption padded to the longest of its batch."""
    joint_grounded_passes: bool = True
    """Run ITM's and LM's text passes layer by layer together, the rows of both through each shared weight at once
    (blip_fast.models.med.joint_text_passes): the same losses with fewer, larger kernels and one gradient per
    shared weight. ``false``: one pass after the other, as the original."""
    activation_checkpointing: bool = False
    """Recompute ViT block activations in backward (memory for compute)."""
    impl: str = "auto"
    """Op backends (``blip_fast.ops``): auto | reference | torch | triton | cuda, optionally followed by
    entries for single ops, e.g. ``auto,lm_loss=reference``."""
    distributed: str = "auto"
    """Under torchrun: ``ddp`` (``auto``: each rank holds the whole model), ``fsdp`` (FSDP2: weights, gradients
    and AdamW state sharded over ranks, see blip_fast.train.fsdp), or ``none`` to refuse more than one process."""
    log_every: int = 50
    """Optimizer steps between metric lines (the only host synchronisations of the loop)."""
    checkpoint_every: int = 1000
    """Optimizer steps between checkpoints (0: only at the end of each epoch and of the run)."""
    keep_last: int = 3
    """Checkpoints kept in the run folder (older ones are deleted once a newer one is on disk)."""
    resume_data_position: bool = True
    """A resumed run continues in the data where its checkpoint stopped, and refuses a checkpoint trained on other
    data. ``false``: keep the checkpoint's weights, optimizer state and step count, and read this run's data from
    the start of the epoch."""
    nonfinite: str = "stop"
    """What a step whose loss or gradient is NaN or infinite does (blip_fast.train.divergence): ``stop`` the run at
    the next log step or checkpoint, naming the step, with no checkpoint written after it; or ``skip`` the step
    (weights and optimizer state unchanged, decided on the device; needs torch's fused AdamW)."""
    max_consecutive_skips: int = 10
    """``nonfinite: skip``: this many skipped steps in a row stop the run as ``stop`` would."""
    tensorboard: bool = True
    """Write TensorBoard events next to metrics.jsonl (needs the ``tensorboard`` package)."""
    eval_size: int = 1000
    """Images of the held-out split used by the end-of-run zero-shot retrieval (0: no evaluation)."""
    eval_itm_k: int = 16
    """Re-rank this many ITC candidates with ITM in the evaluation (the original: 256 on COCO; 0: ITC only)."""
    eval_java: bool = True
    """Caption evaluation: the COCO tokenizer and METEOR run on Java, as the official scores (``false``: tokenized
    in Python, BLEU, ROUGE-L and CIDEr only; blip_fast.evaluation.caption_metrics)."""
    vqa_inference: str = "rank"
    """VQA evaluation: ``rank`` the answer list (the original's ``inference: rank``) or ``generate`` answers."""
    vqa_k: int = 128
    """VQA rank inference: answers kept by their first token's probability, then scored whole (``k_test``)."""
    device: str = "auto"
    """``auto`` (this rank's GPU, else CPU), ``cpu`` or ``cuda``."""
    init_from: str | None = None
    """Start from this trained checkpoint (a Salesforce ``.pth`` such as ``model_base.pth``, one of ours, or a
    Hugging Face directory) of any task, loaded as the original's fine-tuning loads it
    (blip_fast.checkpoint.transfer); ``null``: the model's own initialisation (``model.init``). A resumed run
    takes its weights from its checkpoint instead."""

    def __post_init__(self):
        if self.epochs < 1:
            raise ConfigError(f"train.epochs must be at least 1; got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps must be positive; got {self.max_steps}")
        if self.cuda_graph not in (True, False, "auto"):
            raise ConfigError(f"train.cuda_graph must be true, false or auto; got {self.cuda_graph!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"train.precision must be fp32 or bf16; got {self.precision!r}")
        if self.distributed not in ("auto", "ddp", "fsdp", "none"):
            raise ConfigError(f"train.distributed must be auto, ddp, fsdp or none; got {self.distributed!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train.device must be auto, cpu or cuda; got {self.device!r}")
        if self.nonfinite not in NONFINITE_MODES:
            raise ConfigError(f"train.nonfinite must be one of {', '.join(NONFINITE_MODES)}; got {self.nonfinite!r}")
        from ..ops.registry import validate_impl

        try:
            validate_impl(self.impl, "train.impl")
        except ValueError as error:
            raise ConfigError(str(error)) from None
        for name in ("log_every", "keep_last", "max_consecutive_skips"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1; got {getattr(self, name)}")
        if self.vqa_inference not in ("rank", "generate"):
            raise ConfigError(f"train.vqa_inference must be rank or generate; got {self.vqa_inference!r}")
        if self.vqa_k < 1:
            raise ConfigError(f"train.vqa_k must be at least 1; got {self.vqa_k}")
        for name in ("checkpoint_every", "eval_size", "eval_itm_k", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0; got {getattr(self, name)}")
        if self.alpha_ramp_epochs < 0:
            raise ConfigError(f"train.alpha_ramp_epochs must be >= 0; got {self.alpha_ramp_epochs}")


@dataclass
class ModelInit:
    """``model.init``: the pretrained files the recipe starts from, read offline (blip_fast.checkpoint.init)."""

    vision: str | None = None
    """A timm / DeiT ViT checkpoint (``deit_base_patch16_224-b5f2ef4d.pth`` for ViT-B), position embeddings
    resampled to the image size; ``null``: random."""
    text: str | None = None
    """A Hugging Face ``bert-base-uncased`` folder, for the text encoder and decoder; ``null``: random."""


@dataclass
class PretrainConfig:
    preset: str = "base"
    """Architecture: tiny | base | large (``blip_fast.config`` presets)."""
    model: dict[str, Any] = field(default_factory=dict)
    """BlipConfig fields over the preset (``vision.image_size`` always follows ``data.transform.image_size``), and
    ``init`` (:class:`ModelInit`): the files the weights start from."""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        self.model_config()  # validate the model overrides now, not at step 0
        init = self.model_init()
        if self.train.init_from and (init.vision or init.text):
            raise ConfigError("train.init_from (a trained BLIP checkpoint) and model.init (the ViT and BERT files "
                              "pretraining starts from) both say where the weights come from: give one")
        if self.train.nonfinite == "skip" and self.optim.fused not in ("auto", "torch"):
            # only torch's fused AdamW can skip a step on the device (found_inf); the others would need a host sync
            raise ConfigError(f"train.nonfinite=skip needs torch's fused AdamW (optim.fused=auto or torch); "
                              f"optim.fused={self.optim.fused} cannot skip a step without a host sync")
        if self.train.nonfinite == "skip" and self.train.distributed == "fsdp":
            raise ConfigError("train.nonfinite=skip is not supported with train.distributed=fsdp yet; use stop")

    def model_init(self) -> ModelInit:
        return config_from_dict(ModelInit, self.model.get("init") or {}, "model.init")

    def model_config(self) -> BlipConfig:
        base = config_to_dict(preset(self.preset, image_size=self.data.transform.image_size))
        merged = _merge(base, {k: v for k, v in self.model.items() if k != "init"}, "model")
        merged["vision"]["image_size"] = self.data.transform.image_size
        return config_from_dict(BlipConfig, merged, "model")


def _merge(base: dict, overrides: dict, where: str) -> dict:
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where} must be a mapping; got {overrides!r}")
    merged = dict(base)
    for key, value in overrides.items():
        if key not in base:
            raise ConfigError(f"unknown key {where}.{key}; known: {', '.join(base)}")
        if isinstance(base[key], dict):
            merged[key] = _merge(base[key], value, f"{where}.{key}")
        else:
            merged[key] = value
    return merged


def _set_path(data: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.init_lr=1e-4"`` -> ``("optim.init_lr", 1e-4)`` (the value is read as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({str(error).splitlines()[0]}); quote "
                          "strings with braces or commas, e.g. 'data.paths=[\"shards/{00000..00099}.tar\"]'") from None
    # YAML 1.1 reads "1e-4" as a string (it needs a dot); numbers are what a user means there
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else value
        except ValueError:
            pass
    return key.strip(), value


def resolve_config_path(name_or_path: str | None) -> Path:
    """A shipped config by name (``base``, ``large``, ``tiny-synthetic``) or a YAML path."""
    name = name_or_path or DEFAULT_CONFIG
    if name in SHIPPED:
        return CONFIG_DIR / SHIPPED[name]
    path = Path(name)
    if not path.is_file():
        raise ConfigError(f"config {name!r} is neither a file nor one of the shipped configs ({', '.join(SHIPPED)})")
    return path


def load_pretrain_config(name_or_path: str | None = None, overrides: list[str] = ()) -> PretrainConfig:
    path = resolve_config_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"config {path} is not a text file (not UTF-8): a YAML config is expected") from None
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (preset, model, data, optim, train)")
    for text in overrides:
        key, value = parse_override(text)
        _set_path(data, key, value)
    return config_from_dict(PretrainConfig, data)


def pretrain_config_to_dict(config: PretrainConfig) -> dict:
    return dataclasses.asdict(config)
