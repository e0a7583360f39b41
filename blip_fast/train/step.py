"""One optimizer step of any BLIP training task (the loop body of the original's ``pretrain.py`` and
``train_caption.py``: forward, the summed losses' backward per micro-batch, optional clipping, AdamW), with
nothing read back to the host.

A task says what its forward is (``forward(model, batch, alpha, generator) -> {name: loss}``); pretraining's,
:func:`pretraining_losses`, is the default. The training loop (blip_fast.train.engine) runs the step eagerly;
blip_fast.train.cuda_graph captures and replays it. It lives apart from both so that neither imports the other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch.profiler import record_function

from .distributed import is_fully_sharded, no_sync
from .divergence import gradients_not_finite

LOSSES = ("itc", "itm", "lm")


def pretraining_losses(model, batch, alpha: float | torch.Tensor, generator: torch.Generator | None) -> dict:
    """BlipPretrain's forward on a batch of images and captions (packed where ``batch.packing`` is set)."""
    return model(batch.images, batch.input_ids, batch.attention_mask, alpha=alpha, generator=generator,
                 packing=batch.packing)


def autocast(device: torch.device, precision: str, cache: bool = True):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


def optimizer_step(model, optimizer: torch.optim.Optimizer, micro_batches, alpha: float | torch.Tensor,
                   generator: torch.Generator | None, precision: str = "fp32", clip_grad_norm: float = 0.0,
                   autocast_cache: bool = True, skip_nonfinite: bool = False,
                   forward: Callable = pretraining_losses) -> torch.Tensor:
    """One optimizer step over ``micro_batches`` (what ``forward`` takes, on the model's device: pretraining's
    have ``images``, ``input_ids``, ``attention_mask`` and the captions' ``packing``, None when they are padded).
    ``model`` is a task model, its DDP wrapper, or itself sharded by FSDP2. Returns the losses ``forward`` names,
    in its order (pretraining: [itc, itm, lm]), averaged over the micro-batches, on the device: nothing here waits
    for the GPU. ``alpha`` may be a 0-d device tensor and
    ``autocast_cache`` off, as CUDA graph capture needs (blip_fast.train.cuda_graph). ``skip_nonfinite``: the
    optimizer (built with ``skip_nonfinite``) changes nothing when a loss or gradient is not finite; its
    ``found_inf`` then reads 1 (blip_fast.train.divergence)."""
    accum = len(micro_batches)
    device = micro_batches[0].images.device
    totals = 0.0
    sharded = is_fully_sharded(model)
    if sharded:
        from . import fsdp  # here and below imported only when used: FSDP takes a second to import
    for index, batch in enumerate(micro_batches):
        if sharded:
            fsdp.update_before_forward(model)
        with no_sync(model, skip=index + 1 < accum):
            with autocast(device, precision, autocast_cache):
                stacked = torch.stack([loss.float() for loss in forward(model, batch, alpha, generator).values()])
            with record_function("blip.backward"):
                (stacked.sum() / accum).backward()
        totals += stacked.detach() / accum
    if sharded:
        fsdp.average_replicated_gradients(model)
    with record_function("blip.optimizer"):
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm) if clip_grad_norm else None
        if skip_nonfinite:
            optimizer.found_inf.copy_(gradients_not_finite(model, totals, norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return totals
