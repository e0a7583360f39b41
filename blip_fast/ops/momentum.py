"""Momentum encoders and their feature queues (BLIP section 3.2, from ALBEF / MoCo).

``momentum_update_`` moves every momentum parameter towards its online twin,
``p_m <- m * p_m + (1 - m) * p``. The original walks the parameters in a Python loop, one small
kernel pair per tensor (a sixth of its step on an H100, docs/benchmarks.md); the ``torch`` backend writes the same
update as a linear interpolation, ``p_m + (1 - m) (p - m)``, with one multi-tensor ``_foreach_lerp_``
launch per chunk of tensors (equal up to one rounding).

``enqueue_`` writes the momentum features of the current batch into the queue at its pointer and
advances the pointer (``_dequeue_and_enqueue``). The original reads the pointer to the host
(``int(self.queue_ptr)``) and needs the queue length to be a multiple of the batch; the ``torch``
backend scatters with device-side indices, wraps around the end, and never synchronises.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..shapes import BASE_WIDTH, EMBED_DIM, PRETRAIN_BATCH, QUEUE_SIZE
from .registry import ParityCase, define_op


@torch.no_grad()
def momentum_update_ref(params_m: Sequence[torch.Tensor], params: Sequence[torch.Tensor], momentum: float) -> None:
    for param_m, param in zip(params_m, params, strict=True):
        param_m.data = param_m.data * momentum + param.data * (1.0 - momentum)


@torch.no_grad()
def momentum_update_foreach(params_m: Sequence[torch.Tensor], params: Sequence[torch.Tensor], momentum: float) -> None:
    params_m, params = list(params_m), list(params)
    if len(params_m) != len(params):
        raise ValueError(f"momentum update: {len(params_m)} momentum tensors for {len(params)} online tensors")
    # m + (1 - momentum) (p - m): one pass that reads both lists and writes the momentum copies once, where a
    # multiply then an add reads and writes the copies twice (~0.6 ms a step less traffic at ViT-B, estimated)
    torch._foreach_lerp_(params_m, params, 1.0 - momentum)


@torch.no_grad()
def enqueue_ref(queue: torch.Tensor, ptr: torch.Tensor, feats: torch.Tensor) -> None:
    """``queue`` (D, Q), ``ptr`` (1,) long, ``feats`` (B, D): the original, with its host read."""
    batch, size = feats.shape[0], queue.shape[1]
    position = int(ptr)
    if size % batch != 0:
        raise ValueError(f"queue size {size} must be a multiple of the global batch {batch}")
    queue[:, position : position + batch] = feats.T
    ptr[0] = (position + batch) % size


@torch.no_grad()
def enqueue_scatter(queue: torch.Tensor, ptr: torch.Tensor, feats: torch.Tensor) -> None:
    """Device-side enqueue: no host sync, any batch size up to the queue length."""
    batch, size = feats.shape[0], queue.shape[1]
    if batch > size:
        raise ValueError(f"batch of {batch} features does not fit a queue of {size}")
    columns = (ptr + torch.arange(batch, device=queue.device)) % size  # (B,)
    queue.index_copy_(1, columns, feats.T.to(queue.dtype))
    ptr.copy_((ptr + batch) % size)


momentum_update_op = define_op("momentum_update", momentum_update_ref)
momentum_update_op.register("torch", momentum_update_foreach, devices=("cpu", "cuda"))
enqueue_op = define_op("enqueue", enqueue_ref)
enqueue_op.register("torch", enqueue_scatter, devices=("cpu", "cuda"))


def momentum_update_(params_m, params, momentum: float) -> None:
    """In-place EMA of ``params_m`` towards ``params`` through the selected backend."""
    momentum_update_op(list(params_m), list(params), momentum)


def enqueue_(queue: torch.Tensor, ptr: torch.Tensor, feats: torch.Tensor) -> None:
    """In-place queue write at ``ptr`` and pointer advance through the selected backend."""
    enqueue_op(queue, ptr, feats)


def _momentum_case(shapes):
    def make(device, dtype, generator):
        online = [torch.randn(*s, generator=generator).to(device, dtype) for s in shapes]
        momentum = [torch.randn(*s, generator=generator).to(device, dtype) for s in shapes]
        return (momentum, online, 0.995), {}

    return make


def _enqueue_case(dim, size, batch, start):
    def make(device, dtype, generator):
        queue = torch.randn(dim, size, generator=generator).to(device, dtype)
        feats = torch.randn(batch, dim, generator=generator).to(device, dtype)
        return (queue, torch.tensor([start], device=device), feats), {}

    return make


# one ViT-B block's weights: qkv, attention projection, MLP, a bias
_VIT_B_BLOCK = [(3 * BASE_WIDTH, BASE_WIDTH), (BASE_WIDTH, BASE_WIDTH), (4 * BASE_WIDTH, BASE_WIDTH), (BASE_WIDTH,)]
momentum_update_op.parity_cases.append(
    ParityCase(mode="vit_b_block", shape=" ".join("x".join(map(str, s)) for s in _VIT_B_BLOCK),
               make_inputs=_momentum_case(_VIT_B_BLOCK), inplace_argnums=(0,))
)
# the last batch before the queue wraps
_LAST_PTR = QUEUE_SIZE - PRETRAIN_BATCH
enqueue_op.parity_cases.append(
    ParityCase(mode="pretrain", shape=f"D{EMBED_DIM} Q{QUEUE_SIZE} B{PRETRAIN_BATCH} ptr{_LAST_PTR}",
               make_inputs=_enqueue_case(EMBED_DIM, QUEUE_SIZE, PRETRAIN_BATCH, _LAST_PTR), inplace_argnums=(0, 1))
)
