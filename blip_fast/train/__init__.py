"""Training: the engine every task runs on, and its tasks (``blip-fast pretrain``; caption fine-tuning).

    config.py         PretrainConfig (YAML -> dataclasses, overrides); the shipped configs are in blip_fast/configs
    schedule.py       the original's warm-up + per-epoch step decay, and the alpha ramp
    optim.py          AdamW parameter groups and the fused implementations
    engine.py         the shared loop: Trainer (resume, checkpoints, logging, schedules, divergence)
    pretraining.py    the pretraining task: Pretrainer, pretrain()
    caption.py        the caption fine-tuning task: CaptionTrainer, finetune_caption()
    speed.py          speed applied to a plain model in one order: joint passes, checkpointing, compile, FSDP/DDP, graph
    step.py           optimizer_step: one step (a task's forward, backward, AdamW), run eagerly or as a CUDA graph
    cuda_graph.py     the step captured and replayed as CUDA graphs
    prefetch.py       BatchCopies: each batch's copy to the GPU started one batch ahead, on a side stream
    checkpointing.py  atomic, exact-resume checkpoints, keep-last-K
    distributed.py    torchrun / DDP
    fsdp.py           FSDP2 (fully_shard) layout, sharded momentum update, full-state checkpoints
    metrics.py        progress, metrics.jsonl, TensorBoard
"""

from .config import PretrainConfig, load_pretrain_config
from .engine import RunSummary, Trainer
from .pretraining import Pretrainer, pretrain
from .step import optimizer_step

__all__ = ["PretrainConfig", "Pretrainer", "RunSummary", "Trainer", "load_pretrain_config", "optimizer_step",
           "pretrain"]
