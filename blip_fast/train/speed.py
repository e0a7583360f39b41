"""Speed applied to a plain task model, in one fixed order (torchtitan's ``parallelize``).

The models in blip_fast.models compute BLIP as the paper does; everything that only makes them faster is applied
here, from the run's :class:`~blip_fast.train.config.TrainConfig`, by the trainer and by ``benchmarks/bench_step.py``
alike (no second assembly of the fast path):

1. **text passes**: ITM's and LM's image-grounded passes run layer by layer together (``joint_grounded_passes``,
   pretraining only; packing each batch's captions is the task's, since it is made per batch on the host); with
   ``fp8_vit``, the ViT blocks' linear layers become FP8 matmuls (blip_fast.models.fp8);
2. **activation checkpointing**: ViT blocks recompute their activations in backward (memory for compute);
3. **per-block compile**: each ViT block and text layer compiled on its own (blip_fast.models.compile);
4. **FSDP2 or DDP**: FSDP2 shards the model in place (then the optimizer is built over its shards); DDP wraps it;
5. **CUDA graph** (:func:`build_step`): the whole optimizer step captured and replayed, one CUDA process only.

The order matters: checkpointing and compile act on the blocks FSDP2 then shards, and a graph captures the step of
the finished model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from ..models.vit import VisionTransformer
from .config import OptimConfig, TrainConfig
from .cuda_graph import CudaGraphStep
from .distributed import DistributedContext, wrap_model
from .step import optimizer_step, pretraining_losses

log = logging.getLogger("blip_fast.train")


def apply_speed(model: nn.Module, train: TrainConfig, ctx: DistributedContext) -> nn.Module:
    """Steps 1-4 on ``model`` (on its device); returns what the step runs: DDP's wrapper, or ``model`` itself."""
    if hasattr(model, "joint_grounded_passes"):
        model.joint_grounded_passes = train.joint_grounded_passes
    if train.fp8_vit:
        from ..models.fp8 import use_fp8_linears

        vits = [m for m in model.modules() if isinstance(m, VisionTransformer)]
        log.info("FP8: %d ViT linear layers", sum(use_fp8_linears(vit) for vit in vits))
    if train.activation_checkpointing:
        for vit in (m for m in model.modules() if isinstance(m, VisionTransformer)):
            vit.config.grad_checkpointing = True
    if train.compile:
        from ..models.compile import compile_blocks

        log.info("torch.compile: %d transformer blocks", compile_blocks(model))
    if ctx.sharded:
        from . import fsdp

        fsdp.apply_fsdp(model, ctx.device, train.precision)
    return wrap_model(model, ctx)


def build_step(model: nn.Module, parallel_model: nn.Module, optimizer: torch.optim.Optimizer,
               generator: torch.Generator | None, train: TrainConfig, optim: OptimConfig,
               forward: Callable = pretraining_losses) -> Callable:
    """Step 5: ``step(micro_batches, alpha) -> losses``, replayed from CUDA graphs with ``train.cuda_graph`` (the
    optimizer must then be capturable), else eager through ``parallel_model`` (:func:`apply_speed`'s result)."""
    skip = train.nonfinite == "skip"
    if not isinstance(train.cuda_graph, bool):  # the trainer resolves auto for its run (Trainer._resolve_cuda_graph)
        raise ValueError(f"build_step needs train.cuda_graph true or false, not {train.cuda_graph!r}")
    if train.cuda_graph:
        graph = CudaGraphStep(model, optimizer, generator, train.precision, optim.clip_grad_norm, skip, forward)
        return graph
    return lambda micro_batches, alpha: optimizer_step(parallel_model, optimizer, micro_batches, alpha, generator,
                                                       train.precision, optim.clip_grad_norm, skip_nonfinite=skip,
                                                       forward=forward)
