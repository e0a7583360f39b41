"""Attention over packed variable-length sequences (the text passes of packed captions).

Two ops with the same backends, chosen apart because they pay off apart: ``varlen_attention`` for the text's
self-attention (bidirectional and causal) and ``varlen_cross_attention`` for its cross-attention to the image
tokens. Backends (see :mod:`blip_fast.ops.registry`):

* ``reference`` -- :func:`~blip_fast.kernels.varlen_attention.varlen_attention_ref`: each sequence gathered
  into the padded layout, eager softmax attention, scattered back. Every device.
* ``triton``    -- the kernels of :mod:`blip_fast.kernels.varlen_attention`, CUDA tensors: attention on the
  packed rows, dropout inside, no padding. Registered with ``auto=False`` for both ops: measured on an H100,
  the kernel loses to unpacking around SDPA for self-attention and wins for cross-attention alone
  (docs/benchmarks.md), and cross-attention alone (``BLIP_FAST_IMPL=auto,varlen_cross_attention=triton``)
  waits for its training-step timing.

The model asks :func:`packed_attention_on` whether to take an op at all: with any other backend the
packed text passes keep unpacking around torch's attention, which the reference here would only slow down.

The Triton path is two ``torch.library`` custom ops (forward, backward), so ``torch.compile`` holds them as
opaque nodes and CUDA graphs capture them: the dropout seed is a device tensor drawn from torch's generator.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from blip_fast.kernels import KERNEL_DTYPES
from blip_fast.kernels.varlen_attention import (
    HAS_TRITON,
    AttentionSequences,
    varlen_attention_backward,
    varlen_attention_forward,
    varlen_attention_ref,
)

from ..shapes import BASE_HEADS, FINETUNE_TEXT_LENGTH, HEAD_DIM, IMAGE_TOKENS_224, PRETRAIN_BATCH
from .registry import ParityCase, define_op

__all__ = ["AttentionSequences", "packed_attention_on", "varlen_attention", "varlen_attention_ref",
           "varlen_cross_attention"]


@torch.library.custom_op("blip_fast::varlen_attention_triton", mutates_args=())
def varlen_attention_triton_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: torch.Tensor, q_len: torch.Tensor,
    kv_group: torch.Tensor, kv_start: torch.Tensor, kv_len: torch.Tensor, group_sequences: torch.Tensor,
    group_offsets: torch.Tensor, max_q_len: int, max_kv_len: int, causal: bool, dropout_p: float,
    seed: torch.Tensor, seq_causal: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    seqs = AttentionSequences(q_start, q_len, kv_group, kv_start, kv_len, group_sequences, group_offsets, max_q_len,
                              max_kv_len)
    return varlen_attention_forward(q, k, v, seqs, causal if seq_causal is None else seq_causal, dropout_p, seed)


@varlen_attention_triton_op.register_fake
def _forward_fake(q, k, v, *args):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("blip_fast::varlen_attention_backward_triton", mutates_args=())
def varlen_attention_backward_triton_op(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    q_start: torch.Tensor, q_len: torch.Tensor, kv_group: torch.Tensor, kv_start: torch.Tensor,
    kv_len: torch.Tensor, group_sequences: torch.Tensor, group_offsets: torch.Tensor, max_q_len: int,
    max_kv_len: int, causal: bool, dropout_p: float, seed: torch.Tensor, seq_causal: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seqs = AttentionSequences(q_start, q_len, kv_group, kv_start, kv_len, group_sequences, group_offsets, max_q_len,
                              max_kv_len)
    return varlen_attention_backward(grad, q, k, v, out, lse, seqs, causal if seq_causal is None else seq_causal,
                                     dropout_p, seed)


@varlen_attention_backward_triton_op.register_fake
def _backward_fake(grad, q, k, v, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, *tables = inputs[:10]
    ctx.sizes = inputs[10:14]  # max_q_len, max_kv_len, causal, dropout_p
    ctx.per_sequence = inputs[15] is not None
    flags = (inputs[15],) if ctx.per_sequence else ()
    ctx.save_for_backward(q, k, v, output[0], output[1], inputs[14], *tables, *flags)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, seed, *tables = ctx.saved_tensors
    flags = tables.pop() if ctx.per_sequence else None
    dq, dk, dv = varlen_attention_backward_triton_op(grad_out, q, k, v, out, lse, *tables, *ctx.sizes, seed, flags)
    return (dq, dk, dv) + (None,) * 13


varlen_attention_triton_op.register_autograd(_backward, setup_context=_setup)


def varlen_attention_triton(q, k, v, seqs: AttentionSequences, causal: bool | torch.Tensor = False,
                            dropout_p: float = 0.0):
    """The Triton backend: same contract as :func:`varlen_attention_ref` (dropout from torch's generator)."""
    device = q.device.type
    if torch.is_autocast_enabled(device):  # custom ops are not cast by autocast: cast as its matmuls would
        dtype = torch.get_autocast_dtype(device)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    # the seed stays on the device: no synchronisation, and a CUDA graph draws a new one at each replay
    seed = (torch.randint(0, 2**31 - 1, (1,), device=q.device) if dropout_p > 0.0
            else torch.zeros(1, dtype=torch.int64, device=q.device))
    per_sequence = isinstance(causal, torch.Tensor)
    return varlen_attention_triton_op(q, k, v, *seqs.tensors, seqs.max_q_len, seqs.max_kv_len,
                                      False if per_sequence else causal, dropout_p, seed,
                                      causal if per_sequence else None)[0]


varlen_attention_op = define_op("varlen_attention", varlen_attention_ref)
varlen_cross_attention_op = define_op("varlen_cross_attention", varlen_attention_ref)
for _op in (varlen_attention_op, varlen_cross_attention_op):
    _op.register_triton(varlen_attention_triton, HAS_TRITON, dtypes=KERNEL_DTYPES, auto=False)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: AttentionSequences,
                     causal: bool | torch.Tensor = False, dropout_p: float = 0.0) -> torch.Tensor:
    """Self-attention of packed sequences through the selected backend; see
    :mod:`blip_fast.kernels.varlen_attention`. ``causal`` a bool tensor (S,): each sequence's mode (the Triton
    backend runs them in one launch where every sequence fits one tile)."""
    return varlen_attention_op(q, k, v, seqs, causal, dropout_p)


def varlen_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: AttentionSequences,
                           dropout_p: float = 0.0) -> torch.Tensor:
    """Cross-attention of packed sequences to their key/value groups through the selected backend."""
    return varlen_cross_attention_op(q, k, v, seqs, False, dropout_p)


def packed_attention_on(like: torch.Tensor, cross: bool = False) -> bool:
    """Whether the packed text passes' self-attention (``cross``: cross-attention) runs on tensors like ``like``
    through :func:`varlen_attention` (:func:`varlen_cross_attention`), its kernel being the selected backend,
    instead of unpacking around :func:`~blip_fast.ops.attention`. (Under autocast ``like`` is fp32, which the
    kernel takes as it takes the autocast dtype its entry casts to.)"""
    op = varlen_cross_attention_op if cross else varlen_attention_op
    return op.select(like.device, like.dtype) == "triton"


def _case(lengths: list[int], heads: int, kv_lengths: list[int] | None, causal: bool | list[bool],
          groups: int | None):
    """Self-attention over ``lengths`` (keys ``kv_lengths``, default the same), or, with ``groups``, cross-attention
    of those query sequences to ``groups`` key groups of ``kv_lengths[g]`` rows, sequence s to group s % groups;
    ``causal`` for all sequences or per sequence."""
    def make(device, dtype, generator):
        q_len = torch.tensor(lengths)
        q_start = torch.cumsum(q_len, 0) - q_len
        if groups is None:
            kv_len = torch.tensor(kv_lengths or lengths)
            seqs = AttentionSequences.self_attention(q_start, q_len, kv_len, max(lengths))
            kv_rows = int(q_len.sum())
        else:
            kv_len = torch.tensor(kv_lengths)
            seqs = AttentionSequences.grouped(q_start, q_len, torch.arange(len(lengths)) % groups,
                                              torch.cumsum(kv_len, 0) - kv_len, kv_len, max(lengths), max(kv_lengths))
            kv_rows = int(kv_len.sum())
        seqs = AttentionSequences(*(t.to(device) for t in seqs.tensors), seqs.max_q_len, seqs.max_kv_len)

        def t(rows):
            return torch.randn(rows, heads, HEAD_DIM, generator=generator).to(device, dtype)

        mode = torch.tensor(causal, device=device) if isinstance(causal, list) else causal
        return (t(int(q_len.sum())), t(kv_rows), t(kv_rows), seqs, mode), {}

    return make


def _register_parity_cases() -> None:
    generator = torch.Generator().manual_seed(0)
    # a pretraining batch's caption lengths
    captions = torch.randint(8, FINETUNE_TEXT_LENGTH + 1, (PRETRAIN_BATCH,), generator=generator).tolist()
    cases = [
        ("text_bidirectional_packed", captions, None, False, None),
        ("text_causal_packed", captions, None, True, None),
        # the joint ITM/LM pass: ITM's captions bidirectional, LM's causal, in one table
        ("text_joint_per_sequence", captions * 2, None, [False] * len(captions) + [True] * len(captions), None),
        # ITM's negative texts: padding kept as rows
        ("text_dense_rows", [FINETUNE_TEXT_LENGTH] * 32, captions[:32], False, None),
        ("cross_text_to_image", captions, [IMAGE_TOKENS_224] * 32, False, 32),  # three caption rows per image, as ITM
        # a sequence sees at most its own rows: groups' keys must not overlap (the kernels' contract)
        ("odd", [1, 7, 13, 97], [1, 5, 1, 40], False, None),
    ]
    for mode, lengths, kv_lengths, causal, groups in cases:
        op = varlen_attention_op if groups is None else varlen_cross_attention_op
        op.parity_cases.append(ParityCase(
            mode=mode, shape=f"S{len(lengths)} T{sum(lengths)} H{BASE_HEADS} D{HEAD_DIM}",
            make_inputs=_case(lengths, BASE_HEADS, kv_lengths, causal, groups), grad_argnums=(0, 1, 2)))


_register_parity_cases()


def _attention_flops(q_shape, max_q_len: int, max_kv_len: int, sequences: int, gemms: int) -> int:
    # counted as the padded attention it replaces (S sequences of max_q_len x max_kv_len), as torch counts SDPA
    return gemms * 2 * sequences * q_shape[1] * max_q_len * max_kv_len * q_shape[2]


@register_flop_formula(torch.ops.blip_fast.varlen_attention_triton)
def _forward_flops(q_shape, k_shape, v_shape, q_start_shape, *args, out_shape=None, **kwargs) -> int:
    max_q_len, max_kv_len = args[6], args[7]
    return _attention_flops(q_shape, max_q_len, max_kv_len, q_start_shape[0], 2)


@register_flop_formula(torch.ops.blip_fast.varlen_attention_backward_triton)
def _backward_flops(grad_shape, q_shape, k_shape, v_shape, out_shape_, lse_shape, q_start_shape, *args,
                    out_shape=None, **kwargs) -> int:
    max_q_len, max_kv_len = args[6], args[7]
    return _attention_flops(q_shape, max_q_len, max_kv_len, q_start_shape[0], 4)
