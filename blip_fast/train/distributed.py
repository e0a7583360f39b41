"""torch.distributed for pretraining: process group from torchrun's environment, DDP, rank-0 helpers.

``torchrun --nproc-per-node 8 -m blip_fast.cli pretrain ...`` (or ``--nnodes N --rdzv-endpoint ...``
for several machines) sets RANK / WORLD_SIZE / LOCAL_RANK; each process then trains on its own
share of the data (blip_fast.data.stream splits by rank) on GPU ``LOCAL_RANK``. NCCL on GPUs, gloo
on CPUs. The momentum-feature queue receives every rank's features in rank order
(``BlipPretrain.enqueue``), as the original's ``concat_all_gather``. ``train.distributed`` picks
DDP (every rank holds the whole model; here) or FSDP2 (ranks hold shards; blip_fast.train.fsdp).

DDP details: buffers (the queues) are synced from rank 0 once, then not broadcast before each
forward -- every rank updates them identically, and broadcasting 2 x 57,600 x 256 floats each step
would be pure overhead; gradient accumulation skips the all-reduce of all but the last micro-batch (``no_sync``).
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import logging
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..config import ConfigError

log = logging.getLogger("blip_fast.train")


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False
    """The process group was created here (and is destroyed by :meth:`close`)."""
    data_parallel: str = "none"
    """``ddp`` or ``fsdp`` when several processes train, ``none`` for one."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        return self.data_parallel == "fsdp"

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _device(choice: str, local_rank: int) -> torch.device:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but CUDA is not available on this machine")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(device: str = "auto", mode: str = "auto") -> DistributedContext:
    """The context of this process: a single process, or one rank of a torchrun job."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = _device(device, local_rank)
    if world_size <= 1:
        return DistributedContext(device=target)
    if mode == "none":
        raise ConfigError(f"train.distributed=none but WORLD_SIZE={world_size}: run a single process or allow "
                          "ddp or fsdp")
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if target.type == "cuda" else "gloo"
        if target.type == "cuda":
            torch.cuda.set_device(target)
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    data_parallel = "fsdp" if mode == "fsdp" else "ddp"
    ctx = DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, target, owns, data_parallel)
    log.info("distributed: rank %d of %d on %s (%s, %s)", ctx.rank, ctx.world_size, target, dist.get_backend(),
             data_parallel)
    return ctx


def wrap_model(model: nn.Module, ctx: DistributedContext) -> nn.Module:
    """DDP's wrapper around ``model``; the model itself for one process, or when FSDP sharded it in place."""
    if ctx.data_parallel != "ddp":
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # the queues must start equal on every rank (synced once at construction), then never be broadcast again;
    # torch >= 2.13 says that as forward_sync_buffers=False (broadcast_buffers=False also skips the initial sync)
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)
    ddp = DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=True)
    ddp.broadcast_buffers = False  # after the initial sync
    return ddp


def no_sync(model: nn.Module, skip: bool):
    """Keep a micro-batch's gradients on this rank while accumulating (its forward and backward inside): DDP's
    ``no_sync``, FSDP's gradient-sync switch; a no-op for a single process."""
    if skip and hasattr(model, "no_sync"):
        return model.no_sync()
    if skip and is_fully_sharded(model):
        from .fsdp import no_gradient_sync

        return no_gradient_sync(model)
    return contextlib.nullcontext()


def is_fully_sharded(model: nn.Module) -> bool:
    """``model`` was sharded by FSDP2 (told without importing FSDP, which takes a second, when it was not)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def mean_across_ranks(values: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    """``values`` averaged over ranks (for logging; all ranks must call it)."""
    if ctx.active:
        values = values.clone()
        dist.all_reduce(values)
        values /= ctx.world_size
    return values


def from_main(value, ctx: DistributedContext):
    """Rank 0's ``value`` (any picklable object) on every rank; all ranks must call it. It also synchronises them,
    as a barrier does."""
    if not ctx.active:
        return value
    shared = [value if ctx.is_main else None]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def barrier(ctx: DistributedContext) -> None:
    if ctx.active:
        dist.barrier()
