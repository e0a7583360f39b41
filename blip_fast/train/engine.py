"""The training engine every BLIP task runs on: the loop, exact resume, checkpoints, logging, schedules.

A task (pretraining in blip_fast.train.pretrain, caption fine-tuning in blip_fast.train.caption) is a
:class:`Trainer` subclass that says what it trains -- a model, its losses, its data and its evaluation -- through
a few methods (:meth:`Trainer.build_model`, :meth:`~Trainer.build_data`, :attr:`~Trainer.forward`, ...). Everything
else is shared: speed applied to the model in one order (blip_fast.train.speed), the optimizer and its schedule,
the batches' copies to the GPU, one batch ahead (blip_fast.train.prefetch), gradient accumulation, the step (eager or
a CUDA graph), non-finite losses (blip_fast.train.divergence), logging, checkpoints written atomically and resumed
exactly, and the distributed machinery.

One optimizer step, as the original's training loops:

    lr  <- schedule(epoch, step in epoch)          alpha <- the task's (pretraining: a ramp)
    for each of grad_accum_steps micro-batches:     (DDP / FSDP reduce gradients only on the last)
        losses = task forward(model, batch, alpha)
        (sum(losses) / grad_accum_steps).backward()
    clip (optional), AdamW step

Nothing in the step reads a value back to the host: losses are summed on the device and read every
``log_every`` steps, which is also when ranks average them.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .. import ops
from ..checkpoint.io import CheckpointError, atomic_write
from ..checkpoint.salesforce import TRAINING_CONFIG_KEY
from ..checkpoint.transfer import init_from_checkpoint
from ..config import ConfigError, architecture, config_to_dict
from ..data.batches import CaptionBatches, open_caption_source
from ..data.synth import write_synthetic_dataset
from .checkpointing import (
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
    load_training_checkpoint,
    remove_stale_temp_files,
    rng_state,
    save_training_checkpoint,
    set_aside,
    set_rng_state,
)
from .config import PretrainConfig, pretrain_config_to_dict
from .distributed import (
    DistributedContext,
    barrier,
    from_main,
    init_distributed,
    mean_across_ranks,
)
from .divergence import DivergenceGuard, TrainingDiverged, kept, state_is_finite
from .metrics import RunLog
from .optim import build_optimizer, load_optimizer_state, set_learning_rate
from .prefetch import BatchCopies
from .schedule import learning_rate
from .speed import apply_speed, build_step

log = logging.getLogger("blip_fast.train")

BEST = "best.pth"
"""The run folder's copy of the best epoch's weights (Salesforce format, loadable anywhere)."""

@dataclass
class RunSummary:
    steps: int
    epochs_done: int
    samples: int
    train_seconds: float
    samples_per_s: float
    last_losses: dict[str, float | None]
    checkpoint: str | None
    data: str
    data_backend: str
    """What transformed the images: ``pil``, ``dali_cpu`` or ``dali_gpu``."""
    evaluation: dict | None
    """The end-of-run evaluation of the task (on the best epoch's weights where there was a validation split)."""

    def lines(self) -> list[str]:
        losses = ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} n/a" for k, v in self.last_losses.items())
        lines = [f"trained {self.steps} steps ({self.samples} samples) in {self.train_seconds:.0f} s: "
                 f"{self.samples_per_s:.1f} samples/s; last losses {losses}",
                 f"data: {self.data}"]
        if self.checkpoint:
            lines.append(f"checkpoint: {self.checkpoint}")
        return lines


@dataclass
class Progress:
    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    step_in_epoch: int = 0
    samples: int = 0
    """Pairs trained on, all ranks together."""
    steps_per_epoch: int | None = None
    """Steps the first whole epoch gave, where they differ from the count announced before it (bad entries, which
    are found only as they are read, shorten an epoch); later epochs, the alpha ramp and the ETA use it."""
    best_score: float | None = None
    """The best validation score of the epochs done (``data.val_path``), and its epoch: ``best.pth`` holds its
    weights."""
    best_epoch: int | None = None


class LossWindow:
    """The losses summed on the device since the last log step; steps a skip left out count as nothing."""

    def __init__(self, device: torch.device, names: tuple[str, ...]):
        self.names = names
        self.sums = torch.zeros(len(names), device=device)
        self.counted = torch.zeros((), device=device)
        self.steps = 0
        self.started = time.perf_counter()
        self.last_losses: dict[str, float] = {}

    def add(self, losses: torch.Tensor, weight: torch.Tensor) -> None:
        self.sums += torch.where(weight > 0, losses, 0.0)  # a skipped step's NaN must not reach the sum
        self.counted += weight
        self.steps += 1

    def read(self, ctx: DistributedContext) -> dict:
        """Mean losses over the window's counted steps, averaged over ranks (None where no step counted)."""
        sums = mean_across_ranks(torch.cat([self.sums, self.counted[None]]), ctx).tolist()
        counted = sums.pop()
        means = [value / counted if counted else None for value in sums]
        self.last_losses = dict(zip(self.names, means, strict=True))
        total = sum(means) if counted else None
        return {"loss": total, **{f"loss_{k}": v for k, v in self.last_losses.items()}}

    def reset(self, now: float) -> None:
        self.sums.zero_()
        self.counted.zero_()
        self.steps, self.started = 0, now


def steps_per_epoch(samples: int, rank: int, world: int, roles: int, batch: int, accum: int) -> int:
    """Optimizer steps per epoch on ``rank``: each DataLoader worker (role) drops its last partial batch."""
    on_rank = len(range(rank, samples, world))
    batches = sum(len(range(role, on_rank, roles)) // batch for role in range(roles))
    return batches // accum


def _comparable(model_config: dict) -> dict:
    """What must match to resume: the architecture and the recipe, not activation recomputation (nor the op backend,
    which checkpoints of earlier versions stored)."""
    vision = {k: v for k, v in model_config["vision"].items() if k != "grad_checkpointing"}
    return architecture(model_config) | {"vision": vision}


def _last_on_disk(last_checkpoint: str | None) -> str:
    if last_checkpoint is None:
        return "No checkpoint of this run exists yet."
    return f"The last checkpoint on disk is {last_checkpoint}."


def _data_source(config: dict) -> dict:
    """The fields of a run's config (as saved in its checkpoints) that say which samples it reads."""
    data = config["data"]
    return {k: data.get(k) for k in ("kind", "paths", "image_root", "synthetic_dir", "synthetic_n",
                                     "synthetic_image_size")}


def synthetic_folder(config: PretrainConfig) -> Path:
    """Where the built-in synthetic dataset of a run lives (``data.synthetic_dir``, default ``<train.out>/data``)."""
    return Path(config.data.synthetic_dir or Path(config.train.out) / "data")


def ensure_synthetic_data(config: PretrainConfig, ctx: DistributedContext, printer) -> Path:
    data = config.data
    folder = synthetic_folder(config)
    info_path = folder / "info.json"
    failure = None
    if ctx.is_main and not info_path.is_file():
        printer(f"writing the synthetic dataset ({data.synthetic_n} scenes, {data.synthetic_image_size} px) "
                f"to {folder}")
        # never overwrite: a folder without info.json is not a dataset this command wrote, so whatever is there
        # belongs to the user; the writer refuses a folder that is not empty
        try:
            write_synthetic_dataset(folder, data.synthetic_n, image_size=data.synthetic_image_size,
                                    seed=config.train.seed, overwrite=False)
        except (OSError, ValueError) as error:
            failure = error
    # the other ranks wait for rank 0's dataset: they learn that it failed rather than wait for it forever
    reason = from_main(None if failure is None else str(failure), ctx)
    if failure is not None:
        raise failure
    if reason is not None:
        raise ConfigError(f"rank 0 could not write the synthetic dataset to {folder}: {reason}")
    info = json.loads(info_path.read_text())
    if (info["n"], info["image_size"]) != (data.synthetic_n, data.synthetic_image_size):
        raise ConfigError(f"{folder} holds a synthetic dataset of {info['n']} scenes at {info['image_size']} px, "
                          f"but data.synthetic_n={data.synthetic_n}, data.synthetic_image_size="
                          f"{data.synthetic_image_size}: delete it or set data.synthetic_dir elsewhere")
    return folder


class Trainer(abc.ABC):
    """Builds model, data and optimizer from a run's config and runs :meth:`run`; a task subclasses it (see the
    module docstring) and defines what the methods marked *task* below say."""

    task_name = "training"
    """What the start line calls the run."""
    eval_name = "evaluation:"
    """What the end-of-run evaluation's line starts with."""
    loss_names: tuple[str, ...] = ()
    """*Task*: the names :meth:`forward` returns, in its order."""
    evaluates_on_every_rank = False
    """*Task*: :meth:`evaluate_split` runs on every rank, which split the work (else on the main rank alone)."""
    graphs_step = False
    """*Task*: the task's step has been replayed as a CUDA graph on a GPU and equals the eager step there
    (tests/train/test_cuda_graph.py), so ``train.cuda_graph=auto`` may turn the graph on."""

    def __init__(self, config: PretrainConfig, resume: str | bool = False, printer=print):
        self.config, self.printer = config, printer
        self.out = Path(config.train.out)
        self.ctx = init_distributed(config.train.device, config.train.distributed)
        self.device = self.ctx.device
        # from here on train.cuda_graph is a bool: auto resolved for this run (config.json records what ran)
        self.config = config = self._resolve_cuda_graph(config)
        if config.train.fp8_vit:
            from ..models.fp8 import fp8_unsupported

            lacking = fp8_unsupported(self.device)
            if lacking:
                raise ConfigError(f"train.fp8_vit=true needs {lacking}")
        self.model_config = config.model_config()
        seed = config.train.seed + self.ctx.rank  # as the original: DDP then copies rank 0's weights
        torch.manual_seed(seed)
        self.build_data()
        self.check()
        # on a GPU each batch's copy starts as it is read, one batch ahead, beside the step before (DALI's GPU images
        # are there already: their batches are taken as they come)
        self.copies = BatchCopies(self.device, self.prepare)
        if self.copies.reads_ahead and self.batches.backend != "dali_gpu":
            self.batches.read_ahead(self.copies.start)
        # a mistyped split must not wait for the end of training to show
        for name, path in (("data.val_path", config.data.val_path), ("evaluation split", self.final_evaluation_path())):
            if path and not Path(path).is_file():
                raise ConfigError(f"{name} {path} is not a file")
        model = self.build_model()
        if not self._resumes(resume):  # a resumed run's weights come from its checkpoint
            self.initialise(model)
        self.model = model.to(self.device)
        self.skip_nonfinite = config.train.nonfinite == "skip"
        self.guard = DivergenceGuard(self.device, config.train.nonfinite, config.train.max_consecutive_skips)
        self.last_checkpoint: str | None = None  # the newest checkpoint of this run's lineage on disk
        self.parallel_model = apply_speed(self.model, config.train, self.ctx)
        if self.ctx.sharded:  # the optimizer over FSDP's shards, which the resume then loads
            from . import fsdp

            self.optimizer = fsdp.build_sharded_optimizer(self.model, config.optim, self.device)
        else:
            self.optimizer = build_optimizer(self.model, config.optim, self.device,
                                             capturable=config.train.cuda_graph, skip_nonfinite=self.skip_nonfinite)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.step = build_step(self.model, self.parallel_model, self.optimizer, self.generator, config.train,
                               config.optim, self.forward)
        self.progress = Progress()
        self.alpha = 0.0  # the task's alpha of the last step (pretraining's distillation weight; logged)
        self.resumed_from = self._resume(resume)
        self.samples_per_step = config.data.batch_size * self.ctx.world_size * config.optim.grad_accum_steps
        if self.progress.steps_per_epoch is not None:  # counted by the run this one resumes
            self.steps_per_epoch = self.progress.steps_per_epoch
        self.total_steps = self._planned_steps()

    # ------------------------------------------------------------------ what a task defines

    @abc.abstractmethod
    def forward(self, model, batch, alpha, generator) -> dict:
        """*Task*: ``{loss name: loss}`` of ``model`` (or its DDP wrapper) on a batch (blip_fast.train.step)."""

    @abc.abstractmethod
    def build_data(self) -> None:
        """*Task*: set ``self.batches`` (resumable training batches) and ``self.steps_per_epoch``."""

    @abc.abstractmethod
    def build_model(self) -> torch.nn.Module:
        """*Task*: the plain model, from ``self.model_config`` (speed is applied afterwards, the same for all)."""

    def check(self) -> None:
        """*Task*: start-up checks of the data against the model, before anything is built (none by default)."""
        return None

    def prepare(self, batch):
        """*Task*: a batch as the step takes it, still on the host (as it comes by default)."""
        return batch

    def step_alpha(self) -> float:
        """*Task*: the ``alpha`` the forward gets at the current progress (0 by default)."""
        return 0.0

    def log_values(self) -> dict:
        """*Task*: values of the model logged with each step record (none by default)."""
        return {}

    def evaluate_split(self, model: torch.nn.Module, path: str):
        """*Task*: ``model`` (the plain model, in eval mode) evaluated on the split in ``path``: a result with
        ``metrics`` (a dict), ``score`` (higher is better: what picks the best epoch) and ``summary()``; None when the
        task has no evaluation (the default)."""
        return None

    def final_evaluation_path(self) -> str | None:
        """*Task*: the split the end-of-run evaluation reads (``data.eval_path`` by default)."""
        return self.config.data.eval_path

    # ------------------------------------------------------------------ caption data, for the tasks that train on it

    def caption_source(self):
        """The training pairs ``data`` names: the built-in synthetic scenes (written on first use), or JSON lists or
        tar shards of the user's."""
        data = self.config.data
        if data.kind == "synthetic":
            folder = ensure_synthetic_data(self.config, self.ctx, self.printer)
            return open_caption_source("json", [folder / "train.json"], folder)
        # shards hold their images: image_root then serves the evaluation lists only
        return open_caption_source(data.kind, data.paths, data.image_root if data.kind == "json" else None)

    @property
    def pins_batches(self) -> bool:
        """Whether the training batches come in page-locked memory: on a GPU, where their copies (``non_blocking``)
        then run beside the host instead of stopping it."""
        return self.device.type == "cuda"

    def use_caption_batches(self, source, prompt: str = "") -> None:
        """``self.batches`` of ``source``'s pairs (each caption after ``prompt``) and ``self.steps_per_epoch``."""
        config, data = self.config, self.config.data
        self.batches = CaptionBatches(
            source, data.transform, data.batch_size, backend=data.backend, num_workers=data.num_workers,
            seed=config.train.seed, shuffle=True, shuffle_buffer=data.shuffle_buffer, rank=self.ctx.rank,
            world_size=self.ctx.world_size, max_words=data.max_words, max_length=self.model_config.max_text_length,
            drop_last=True, prompt=prompt, pin_memory=self.pins_batches)
        if hasattr(source, "__len__") and data.kind != "shards":
            self.count_steps(len(source))
            return
        if data.steps_per_epoch is not None:  # batches per rank: optimizer steps take grad_accum_steps each
            self.steps_per_epoch = data.steps_per_epoch // config.optim.grad_accum_steps
            if self.steps_per_epoch < 1:
                raise ConfigError(f"data.steps_per_epoch={data.steps_per_epoch} batches give no optimizer step of "
                                  f"optim.grad_accum_steps={config.optim.grad_accum_steps}")
        else:
            raise ConfigError("data.kind=shards: set data.steps_per_epoch (batches per epoch per rank), which the "
                              "alpha ramp and the ETA need; shards do not say how many samples they hold")

    def count_steps(self, samples: int) -> None:
        """``self.steps_per_epoch`` of a list of ``samples`` training samples (refused when it gives no step)."""
        data = self.config.data
        self.steps_per_epoch = steps_per_epoch(samples, self.ctx.rank, self.ctx.world_size, max(1, data.num_workers),
                                               data.batch_size, self.config.optim.grad_accum_steps)
        if self.steps_per_epoch < 1:
            raise ConfigError(f"{samples} training samples give no full batch of {data.batch_size} per rank "
                              f"({self.ctx.world_size} ranks x {max(1, data.num_workers)} workers): lower "
                              "data.batch_size or data.num_workers")


    # ------------------------------------------------------------------ the run

    def _planned_steps(self) -> int:
        """Optimizer steps of the whole run: those done, then the rest of this epoch and of the later ones."""
        p, epochs = self.progress, self.config.train.epochs
        total = p.step + (epochs - p.epoch) * self.steps_per_epoch - p.step_in_epoch
        return total if self.config.train.max_steps is None else min(total, self.config.train.max_steps)

    # ------------------------------------------------------------------ set-up

    def _resumes(self, resume: str | bool) -> bool:
        return bool(resume) and (resume is not True or latest_checkpoint(self.out) is not None)

    def initialise(self, model: torch.nn.Module) -> None:
        """The weights the run starts from, where the config names files: a trained checkpoint of any task
        (``train.init_from``, loaded as the original's fine-tuning loads it), or the ViT and BERT files of the
        pretraining recipe (``model.init``); each says in a few lines what it loaded and what it left fresh."""
        reports = []
        if self.config.train.init_from:
            reports.append(init_from_checkpoint(model, self.config.train.init_from))
        init = self.config.model_init()
        if init.vision or init.text:
            from ..checkpoint.init import init_text, init_vision

            if init.vision:
                reports.append(init_vision(model, init.vision))
            if init.text:
                reports.append(init_text(model, init.text))
        if self.ctx.is_main:
            for report in reports:
                for line in report.lines():
                    self.printer(line)

    def _resolve_cuda_graph(self, config: PretrainConfig) -> PretrainConfig:
        """``config`` with ``train.cuda_graph`` a bool: ``true`` checked (a ConfigError names what it lacks), ``auto``
        on where the graph can run and has run on a GPU, else off, with the reason printed on a GPU."""
        setting = config.train.cuda_graph
        if setting is False:
            return config
        needs = []  # what any graph needs
        if self.device.type != "cuda":
            needs.append(f"a CUDA device (this run trains on {self.device})")
        if self.ctx.active:
            needs.append(f"one process (this run has {self.ctx.world_size}: collectives stay outside graphs)")
        if config.optim.fused not in ("auto", "torch"):
            needs.append("torch's fused AdamW (optim.fused=auto or torch)")
        if setting is True:
            if needs:
                raise ConfigError("train.cuda_graph=true needs " + "; ".join(needs))
            return config
        untried = []  # what auto leaves to an explicit true until a GPU run has shown it
        if not self.graphs_step:
            untried.append(f"{self.task_name}'s step has not been replayed on a GPU")
        if config.optim.grad_accum_steps != 1:
            untried.append("gradient accumulation")
        if config.train.activation_checkpointing:
            untried.append("activation checkpointing")
        on = not needs and not untried
        if not on and self.device.type == "cuda" and self.ctx.is_main:
            self.printer("train.cuda_graph=auto: off (" + "; ".join(needs + untried) + ")"
                         + ("; train.cuda_graph=true tries it" if not needs else ""))
        return dataclasses.replace(config, train=dataclasses.replace(config.train, cuda_graph=on))

    def _resume(self, resume: str | bool) -> str | None:
        if not resume:
            return None
        path = latest_checkpoint(self.out) if resume is True else Path(resume)
        if path is None:
            self.printer(f"no checkpoint in {self.out / 'checkpoints'}: starting a new run")
            return None
        payload = self._load_for_resume(path)
        if _comparable(payload[TRAINING_CONFIG_KEY]) != _comparable(config_to_dict(self.model_config)):
            raise CheckpointError(f"{path} was trained with a different model configuration; resume it with the "
                                  "config it was written with (saved as config.json in its run folder)")
        if not state_is_finite(payload["model"]):
            raise CheckpointError(f"{path} holds NaN or infinite weights: resume from an earlier checkpoint")
        if len(payload["data"]) != self.ctx.world_size:
            raise CheckpointError(f"{path} was written by {len(payload['data'])} ranks; resume it with as many "
                                  f"(this run has {self.ctx.world_size}) so the data continues exactly")
        same_data = _data_source(payload["config"]) == _data_source(pretrain_config_to_dict(self.config))
        if not same_data and self.config.train.resume_data_position:
            raise CheckpointError(
                f"{path} was trained on other data ({_data_source(payload['config'])}; this run: "
                f"{_data_source(pretrain_config_to_dict(self.config))}), so its position in the data does not apply. "
                "Resume with its data, or set train.resume_data_position=false to keep its weights, optimizer and "
                "step count and read this data from the start")
        if self.ctx.sharded:
            from . import fsdp

            def load_shards(optimizer_state: dict) -> None:
                fsdp.load_full_state_dicts(self.model, self.optimizer, payload["model"], optimizer_state)

            load_optimizer_state(self.optimizer, payload["optimizer"], load_shards)
        else:
            self.model.load_state_dict(payload["model"])
            load_optimizer_state(self.optimizer, payload["optimizer"])
        self.progress = Progress(**payload["progress"])
        if self.config.train.resume_data_position:
            self.batches.load_state_dict(payload["data"][self.ctx.rank])
        set_rng_state(payload["rng"][self.ctx.rank], self.generator)
        self.printer(f"resuming from {path} at step {self.progress.step} (epoch {self.progress.epoch})"
                     f"{'' if self.config.train.resume_data_position else ', reading the data from the start'}")
        if self.ctx.is_main:
            self._set_aside_abandoned(self.progress.step)
        barrier(self.ctx)
        self.last_checkpoint = str(path)
        return str(path)

    def _load_for_resume(self, path: Path) -> dict:
        try:
            return load_training_checkpoint(path)
        except CheckpointError as error:
            others = [p for p in list_checkpoints(self.out) if p != path]
            if not others:
                raise
            names = ", ".join(p.name for p in others[-3:])
            raise CheckpointError(f"{error}. Other checkpoints of this run: {names} in {others[-1].parent}; resume "
                                  f"one of them with --resume {others[-1]}") from None

    def _set_aside_abandoned(self, step: int) -> None:
        """Resuming from step ``step`` abandons the checkpoints of later steps: they move to a folder of their own,
        never deleted, where neither the rotation of ``keep_last`` nor ``--resume`` (latest) takes them."""
        later = [p for p in list_checkpoints(self.out) if checkpoint_step(p) > step]
        if not later:
            return
        folder = set_aside(self.out, later, f"abandoned-after-step-{step:08d}-{time.strftime('%Y%m%d-%H%M%S')}")
        self.printer(f"the checkpoints of steps {', '.join(str(checkpoint_step(p)) for p in later)} come after step "
                     f"{step}, where this run resumes: moved to {folder} (kept, not deleted)")

    # ------------------------------------------------------------------ state

    def _gather(self, value) -> list:
        if not self.ctx.active:
            return [value]
        values = [None] * self.ctx.world_size
        dist.all_gather_object(values, value)
        return values

    def check_finite(self) -> int:
        """Stop the run (:class:`TrainingDiverged`) if a step went non-finite (see blip_fast.train.divergence); else
        the number of steps skipped so far. A host read: called at log steps and before checkpoints only."""
        first, skipped, longest = self.guard.state()
        if self.ctx.active:  # every rank stops together: the earliest bad step and the most skips of any rank
            values = torch.tensor([first if first >= 0 else 2**62, -skipped, -longest], device=self.device)
            dist.all_reduce(values, op=dist.ReduceOp.MIN)
            first, skipped, longest = values.tolist()
            first, skipped, longest = (first if first < 2**62 else -1), -skipped, -longest
        return self.guard.check(first, skipped, longest, self.last_checkpoint)

    def save(self, final: bool = False) -> Path | None:
        """Write a checkpoint of the current step (every rank must call it), never of a non-finite state. A failed
        write is a warning (the run goes on and the next save tries again) except for the ``final`` one."""
        self.check_finite()
        data, rng = self._gather(self.batches.state_dict()), self._gather(rng_state(self.generator))
        if self.ctx.sharded:  # gathered on rank 0, in the format of the unsharded state dicts
            from . import fsdp

            model_state, optimizer_state = fsdp.full_state_dicts(self.model, self.optimizer)
        else:
            model_state, optimizer_state = self.model.state_dict(), self.optimizer.state_dict()
        finite = state_is_finite(model_state) if self.ctx.is_main else True
        if not all(self._gather(finite)):  # finite losses, but a non-finite gradient reached the weights
            raise TrainingDiverged(f"training diverged: the weights after step {self.progress.step} are not finite "
                                   f"(NaN or inf). {kept(self.last_checkpoint)} Lower optim.init_lr or set "
                                   "optim.clip_grad_norm.")
        path, error = None, None
        if self.ctx.is_main:
            payload = {"model": model_state, "optimizer": optimizer_state,
                       "progress": asdict(self.progress), "data": data, "rng": rng,
                       "config": pretrain_config_to_dict(self.config),
                       TRAINING_CONFIG_KEY: config_to_dict(self.model_config)}
            try:
                path = save_training_checkpoint(self.out, self.progress.step, payload, self.config.train.keep_last)
                self.last_checkpoint = str(path)
            except OSError as caught:
                error = caught
        if all(self._gather(error is None)):  # also the barrier: every rank knows whether the write succeeded
            return path
        if final:
            raise OSError(f"could not write the final checkpoint, of step {self.progress.step}"
                          f"{f' ({error})' if error else ''}: the trained weights are not on disk. "
                          f"{_last_on_disk(self.last_checkpoint)}")
        # a full disk or a lost mount must not end hours of training: checkpoints are written atomically, so the
        # one before is intact, and the next save tries again
        self.printer(f"warning: could not write the checkpoint of step {self.progress.step} ({error}); "
                     f"{_last_on_disk(self.last_checkpoint)} Training continues; the next checkpoint tries again.")
        return None

    # ------------------------------------------------------------------ evaluation

    def _plain_model(self) -> torch.nn.Module:
        """The model as the evaluations call it: itself, or under FSDP an unsharded copy (every rank must call;
        the evaluation calls the model's parts directly, outside FSDP's forward hooks)."""
        if self.ctx.sharded:
            from . import fsdp

            return fsdp.unsharded_copy(self.model)
        return self.model

    def _evaluated(self, path: str, model: torch.nn.Module | None):
        """The task's evaluation of ``model`` on ``path`` in fp32 whatever the training precision, as the original
        (bf16 similarities tie and reorder candidates): on every rank where the task splits its evaluation over them
        (:attr:`evaluates_on_every_rank`), else on the main rank, None elsewhere. Every rank must call it."""
        result = None
        if self.ctx.is_main or self.evaluates_on_every_rank:
            was_training = model.training
            model.eval()
            try:
                with ops.impl_scope(self.config.train.impl):
                    result = self.evaluate_split(model, path)
            finally:
                model.train(was_training)
        barrier(self.ctx)
        return result

    def validate(self, runlog: RunLog, epoch: int) -> None:
        """After each epoch, where ``data.val_path`` is set: evaluate on it and keep the best epoch's weights in
        ``best.pth`` (written atomically; the original's ``checkpoint_best.pth``)."""
        if not self.config.data.val_path:
            return
        p = self.progress
        model = self._plain_model()
        result = self._evaluated(self.config.data.val_path, model)
        improved = self.ctx.is_main and result is not None and (p.best_score is None or result.score > p.best_score)
        if self.ctx.is_main and result is not None:
            runlog.event({"kind": "val", "epoch": epoch, "step": p.step, **result.metrics},
                         f"validation after epoch {epoch}: {result.summary()}"
                         + (" (best so far)" if improved else ""))
        if improved:
            from ..checkpoint import save_salesforce

            save_salesforce(model, self.out / BEST)
            p.best_score, p.best_epoch = result.score, epoch
        best = self._gather((p.best_score, p.best_epoch))[0]  # every rank keeps the same progress
        p.best_score, p.best_epoch = best

    def evaluate(self, runlog: RunLog) -> dict | None:
        """The end-of-run evaluation on the task's split, with the best epoch's weights where a validation split
        chose one (the original reports the test split at the best epoch)."""
        path = self.final_evaluation_path()
        if not path:
            return None
        best = self.out / BEST if self.progress.best_epoch is not None else None
        if best is None:
            model = self._plain_model()
        else:  # only the ranks that evaluate read the file
            from ..checkpoint import load_salesforce

            evaluates = self.ctx.is_main or self.evaluates_on_every_rank
            model = load_salesforce(best).to(self.device) if evaluates else None
        result = self._evaluated(path, model)
        if result is None:
            return None
        which = f"the best epoch's ({self.progress.best_epoch}) " if best else ""
        runlog.event({"kind": "eval", "step": self.progress.step, "best_epoch": self.progress.best_epoch,
                      **result.metrics}, f"{self.eval_name} {which}{result.summary()}")
        return {**asdict(result), "metrics": result.metrics}  # (a property of some results)

    # ------------------------------------------------------------------ the loop

    def train_step(self, micro_batches) -> torch.Tensor:
        """One optimizer step at the current progress (learning rate from the schedule, alpha from the task)."""
        p = self.progress
        set_learning_rate(self.optimizer, learning_rate(self.config.optim, p.epoch, p.step_in_epoch,
                                                         self.config.train.epochs))
        self.alpha = self.step_alpha()
        return self.step(micro_batches, self.alpha)

    def run(self) -> RunSummary:
        if self.ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            for stale in remove_stale_temp_files(self.out):
                self.printer(f"removed {stale}, left by an interrupted checkpoint write")
            resolved = pretrain_config_to_dict(self.config) | {"resolved_model": config_to_dict(self.model_config)}
            atomic_write(self.out / "config.json", lambda t: Path(t).write_text(json.dumps(resolved, indent=1)))
        runlog = RunLog(self.out, self.total_steps, enabled=self.ctx.is_main,
                        tensorboard=self.config.train.tensorboard, printer=self.printer)
        try:
            return self._run(runlog)
        except TrainingDiverged as error:
            runlog.event({"kind": "diverged", "step": self.progress.step, "message": str(error)}, str(error))
            raise
        finally:
            runlog.close()

    def _run(self, runlog: RunLog) -> RunSummary:
        config, p = self.config, self.progress
        trained = sum(param.numel() for param in self.model.parameters() if param.requires_grad)
        ranks = f" x {self.ctx.world_size} ranks" if self.ctx.active else ""
        self.printer(f"{self.task_name} {config.preset} BLIP ({trained / 1e6:.1f} M trained parameters) on "
                     f"{self.device}{ranks}: {self.total_steps} steps of "
                     f"{self.samples_per_step} pairs ({self.steps_per_epoch} per epoch{self._counted()}), images via "
                     f"{self.batches.backend}, {config.train.precision}, out {self.out}")
        if self.resumed_from:  # steps after this one may be in metrics.jsonl already, from the abandoned run
            runlog.event({"kind": "resume", "step": p.step, "checkpoint": self.resumed_from},
                         f"resumed at step {p.step}: records of later steps above this line come from the run it "
                         "continues")
        last_saved = p.step if self.resumed_from else None
        window = LossWindow(self.device, self.loss_names)
        started = time.perf_counter()
        start_samples = p.samples
        runlog.start(p.step)
        self.model.train()
        with ops.impl_scope(config.train.impl):
            while p.epoch < config.train.epochs and p.step < self.total_steps:
                self.batches.set_epoch(p.epoch)
                # a pass resumed at the end of its epoch's data has nothing left to give, and that is no fault
                pending, steps_in_pass, from_epoch_start = [], 0, p.step_in_epoch == 0
                for batch in self.batches:
                    pending.append(self.copies.take(batch))
                    if len(pending) < config.optim.grad_accum_steps:
                        continue
                    losses = self.train_step(pending)
                    skipped = self.optimizer.found_inf.clone() if self.skip_nonfinite else None
                    window.add(losses, self.guard.record(p.step + 1, losses, skipped))
                    pending = []
                    steps_in_pass += 1
                    p.step, p.step_in_epoch = p.step + 1, p.step_in_epoch + 1
                    p.samples += self.samples_per_step
                    if p.step % config.train.log_every == 0 or p.step == self.total_steps:
                        self._log(runlog, window, started)
                    # a failed write leaves last_saved behind, so the run's end tries again, then as an error
                    if config.train.checkpoint_every and p.step % config.train.checkpoint_every == 0 and self.save():
                        last_saved = p.step
                    if p.step >= self.total_steps:
                        if p.step_in_epoch == self.steps_per_epoch:  # the run ends with an epoch: validate it
                            # (its pass is not closed here: a run resuming from this step closes it and advances
                            # the epoch, and validates the same weights again, which changes nothing)
                            self.validate(runlog, p.epoch)
                        break
                else:  # the epoch's data is used up
                    if steps_in_pass == 0 and from_epoch_start:
                        raise ValueError(f"epoch {p.epoch} gave no training batch: {self._no_batch_reason()}")
                    p.epoch, p.step_in_epoch = p.epoch + 1, 0
                    if from_epoch_start and steps_in_pass != self.steps_per_epoch:
                        self._recount(steps_in_pass, runlog)
                    if config.train.checkpoint_every == 0 and self.save():
                        last_saved = p.step
                    self.validate(runlog, p.epoch - 1)
            if window.steps:  # steps after the last log step
                self._log(runlog, window, started)
            seconds = time.perf_counter() - started
            path = self.save(final=True) if last_saved != p.step else self.last_checkpoint
            evaluation = self.evaluate(runlog)
        samples = p.samples - start_samples
        summary = RunSummary(p.step, p.epoch, samples, seconds, samples / seconds if seconds > 0 else math.nan,
                             window.last_losses, str(path) if path else None, self.batches.stats.summary(),
                             self.batches.backend, evaluation)
        if self.ctx.is_main:
            for line in summary.lines():
                self.printer(line)
            atomic_write(self.out / "summary.json", lambda t: Path(t).write_text(json.dumps(asdict(summary), indent=1)))
        return summary

    def _counted(self) -> str:
        # a JSON list's count comes from its entries; shards say none, so their count is the user's own
        if self.progress.steps_per_epoch is not None or self.config.data.kind != "json":
            return ""
        return ", or fewer where entries turn out bad as they are read"

    def _recount(self, steps: int, runlog: RunLog) -> None:
        """The epoch just done gave ``steps`` steps, not the announced count: plan the rest of the run with it."""
        self.printer(f"epoch {self.progress.epoch - 1} gave {steps} steps, not the {self.steps_per_epoch} announced "
                     f"({self.batches.stats.summary()}): the later epochs are planned with {steps}")
        self.steps_per_epoch = self.progress.steps_per_epoch = steps
        self.total_steps = runlog.total_steps = self._planned_steps()

    def _no_batch_reason(self) -> str:
        stats = self.batches.stats
        if stats.total_skipped:
            return (f"every sample but {stats.samples} was skipped ({stats.summary()}); the first reasons: "
                    + "; ".join(f"{k}: {v}" for k, v in sorted(stats.first.items())[:3]))
        return (f"{stats.samples} usable samples do not fill a batch of {self.config.data.batch_size} on each of the "
                f"{max(1, self.config.data.num_workers)} workers")

    def _log(self, runlog: RunLog, window: LossWindow, started: float) -> None:
        """The window's mean losses (a host read, the loop's only one besides checkpoints) as one record."""
        skipped = self.check_finite()
        p = self.progress
        now = time.perf_counter()
        record = {"step": p.step, "epoch": p.epoch, "lr": float(self.optimizer.param_groups[0]["lr"]),
                  "alpha": self.alpha, **self.log_values(), **window.read(self.ctx),
                  "samples_per_s": window.steps * self.samples_per_step / (now - window.started),
                  "elapsed_s": now - started, "skipped": self.batches.stats.total_skipped}
        if self.skip_nonfinite:
            record["skipped_steps"] = skipped
        runlog.step(record)
        window.reset(now)

    def close(self) -> None:
        self.ctx.close()


def train_task(trainer_class: type[Trainer], config: PretrainConfig, resume: str | bool = False,
               printer=print) -> RunSummary:
    """Build the task's trainer, run it, and release its process group whatever happens."""
    trainer = trainer_class(config, resume=resume, printer=printer)
    try:
        return trainer.run()
    finally:
        trainer.close()
