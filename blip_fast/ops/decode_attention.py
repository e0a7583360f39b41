"""Attention of a decoding step (generation): a few queries per key/value row, no causality, no dropout, no
gradient. Backends (see :mod:`blip_fast.ops.registry`):

* ``reference`` -- :func:`~blip_fast.kernels.decode_attention.decode_attention_ref`, eager softmax attention;
* ``torch``     -- ``ops.attention``'s SDPA path, what every decoding step ran before this op existed;
* ``triton``    -- the split-key kernels of :mod:`blip_fast.kernels.decode_attention`, CUDA tensors, as a
  ``torch.library`` custom op (opaque to ``torch.compile``, captured by the decoding step's CUDA graph). Registered
  with ``auto=False`` until a GPU run of ``bench generate`` times it against SDPA
  (``BLIP_FAST_IMPL=auto,decode_attention=triton`` selects it).

The text transformer calls it for the steps that read a :class:`~blip_fast.models.med.KVCache`: self-attention of
the one-token steps, and cross-attention of every step, where an image's beams or sampled captions are stacked as
queries against its keys/values, held once.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from blip_fast.kernels import KERNEL_DTYPES
from blip_fast.kernels.decode_attention import (
    HAS_TRITON,
    decode_attention_forward,
    decode_attention_ref,
    refuse_gradients,
)

from ..shapes import BASE_HEADS, FINETUNE_TEXT_LENGTH, HEAD_DIM, IMAGE_TOKENS_384, PRETRAIN_TEXT_LENGTH
from .attention import attention_sdpa
from .registry import ParityCase, define_op


@torch.library.custom_op("blip_fast::decode_attention_triton", mutates_args=())
def decode_attention_triton_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    return decode_attention_forward(q, k, v, key_padding_mask)


@decode_attention_triton_op.register_fake
def _fake(q, k, v, key_padding_mask):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def decode_attention_triton(q, k, v, key_padding_mask=None):
    """The Triton backend (same contract as the reference; no gradient)."""
    device = q.device.type
    if torch.is_autocast_enabled(device):  # custom ops are not cast by autocast: cast as its matmuls would
        dtype = torch.get_autocast_dtype(device)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    refuse_gradients(q, k, v)  # before the custom op, whose missing autograd would fail only at backward
    return decode_attention_triton_op(q, k, v, key_padding_mask)


def decode_attention_sdpa(q, k, v, key_padding_mask=None):
    return attention_sdpa(q, k, v, key_padding_mask)


decode_attention_op = define_op("decode_attention", decode_attention_ref)
decode_attention_op.register("torch", decode_attention_sdpa, devices=("cpu", "cuda"))
decode_attention_op.register_triton(decode_attention_triton, HAS_TRITON, dtypes=KERNEL_DTYPES, auto=False)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``q`` (B, H, M, D) against ``k``, ``v`` (B, H, N, D), keys where ``key_padding_mask`` (B, N) is True (None:
    all), through the selected backend: ``ops.attention`` without causality and dropout, for decoding steps."""
    return decode_attention_op(q, k, v, key_padding_mask)


def _case(rows: int, queries: int, keys: int, mask: str):
    """``mask``: "none", "padding" (each row's own valid length) or "prefix" (the static decoding step's: one
    visible prefix broadcast over the rows, a stride-0 mask)."""
    def make(device, dtype, generator):
        def t(length):
            return torch.randn(rows, BASE_HEADS, length, HEAD_DIM, generator=generator).to(device, dtype)

        key_padding_mask = None
        if mask == "padding":
            lengths = torch.randint(1, keys + 1, (rows,), generator=generator)
            key_padding_mask = (torch.arange(keys)[None, :] < lengths[:, None]).to(device)
        elif mask == "prefix":
            key_padding_mask = (torch.arange(keys, device=device) < keys // 2 + 1)[None].expand(rows, keys)
        return (t(queries), t(keys), t(keys), key_padding_mask), {}

    return make


# captioning's beam search (blip_fast.configs caption_coco: 3 beams, 384 px) on a batch of 32 images, and on one
_BEAMS, _IMAGES, _PROMPT = 3, 32, 5
for _mode, _rows, _queries, _keys, _mask in [
    ("cross_beams_to_image", _IMAGES, _BEAMS, IMAGE_TOKENS_384, "none"),
    ("cross_prompt_to_image", _IMAGES, _BEAMS * _PROMPT, IMAGE_TOKENS_384, "none"),
    ("cross_one_image", 1, _BEAMS, IMAGE_TOKENS_384, "none"),
    ("self_step_dynamic", _IMAGES * _BEAMS, 1, PRETRAIN_TEXT_LENGTH // 2, "none"),
    ("self_step_static", _IMAGES * _BEAMS, 1, PRETRAIN_TEXT_LENGTH, "prefix"),
    # VQA's answer decoder: its context is the question's tokens, with their padding
    ("cross_answer_to_question", _IMAGES, _BEAMS, FINETUNE_TEXT_LENGTH, "padding"),
]:
    decode_attention_op.parity_cases.append(ParityCase(
        mode=_mode, shape=f"B{_rows} H{BASE_HEADS} M{_queries} N{_keys} D{HEAD_DIM}",
        make_inputs=_case(_rows, _queries, _keys, _mask)))


@register_flop_formula(torch.ops.blip_fast.decode_attention_triton)
def _flops(q_shape, k_shape, v_shape, mask_shape, *args, out_shape=None, **kwargs) -> int:
    rows, heads, queries, dim = q_shape
    return 2 * 2 * rows * heads * queries * k_shape[2] * dim
