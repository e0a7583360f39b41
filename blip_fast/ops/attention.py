"""Scaled dot-product attention in BLIP's three modes.

* bidirectional self-attention: ViT blocks (no mask) and the text encoder (key padding mask);
* causal self-attention: the image-grounded text decoder (causal mask AND key padding mask);
* cross-attention: text queries over image tokens (or, for VQA's answer decoder, over the
  question's tokens, with their padding mask).

Inputs are ``q: (B, H, Lq, D)``, ``k, v: (B, H, Lk, D)`` and an optional boolean key padding mask
``(B, Lk)`` (True = attend). Causal masking aligns query ``i`` with key ``i`` and needs
``Lq == Lk``; incremental decoding with a key/value cache passes ``causal=False`` because the one
new query may see every cached key.

The reference follows BERT/BLIP's ``BertSelfAttention`` (``models/med.py``): scores scaled by
``1/sqrt(D)``, masked positions excluded, softmax, dropout on the probabilities. The original adds
``-10000`` to masked scores; we exclude them exactly instead (identical wherever a row has one
visible key, i.e. every real caption, which starts with [CLS]/[ENC]/[DEC]). A row whose keys are
all masked returns zeros: defined, finite, and what fused kernels produce.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..shapes import (
    BASE_HEADS,
    FINETUNE_TEXT_LENGTH,
    HEAD_DIM,
    IMAGE_TOKENS_224,
    IMAGE_TOKENS_384,
    PRETRAIN_TEXT_LENGTH,
)
from .registry import ParityCase, define_op


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask, causal: bool) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects (B, H, L, D) tensors; got {tuple(q.shape)}, {tuple(k.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal attention needs Lq == Lk; got {q.shape[2]} and {k.shape[2]}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or key_padding_mask.shape != (k.shape[0], k.shape[2]):
            raise ValueError(
                f"key_padding_mask must be bool (B, Lk) = {(k.shape[0], k.shape[2])}; "
                f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
            )


def _visibility(q, k, key_padding_mask, causal) -> torch.Tensor | None:
    """Boolean (B|1, 1, Lq, Lk) mask of the keys each query may see, or None for 'all'."""
    visible = None
    if key_padding_mask is not None:
        visible = key_padding_mask[:, None, None, :]
    if causal:
        lq, lk = q.shape[2], k.shape[2]
        tri = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()[None, None]
        visible = tri if visible is None else visible & tri
    return visible


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Eager softmax attention computed in ``promote_types(dtype, float32)``; returns q's dtype."""
    _check(q, k, v, key_padding_mask, causal)
    compute = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf = q.to(compute), k.to(compute), v.to(compute)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, H, Lq, Lk)
    visible = _visibility(q, k, key_padding_mask, causal)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if visible is not None:
        # rows with no visible key: softmax of all -inf is NaN; define them as zeros
        probs = probs.masked_fill(~visible.any(dim=-1, keepdim=True), 0.0)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, vf).to(q.dtype)


# With a padding mask, torch's default choice on CUDA (cuDNN) is not the fastest: measured on the H100
# (docs/benchmarks.md; torch 2.11, bf16, forward + backward) the memory-efficient kernel takes 298 instead of
# 446 us for text self-attention at B288 L35, and 269 instead of 405 us for causal B96 L35. So masked calls
# put it first. Every backend stays enabled behind it (set_priority), so an input it cannot take still runs,
# and on the CPU, which has no such kernel, the choice is the default one. Unmasked calls keep torch's
# choice, which measured fastest or within 1% of it (the ViT, cross-attention to the image, causal LM).
MASKED_BACKEND_PRIORITY = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                           SDPBackend.MATH]


def attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """torch's fused scaled_dot_product_attention; masked calls prefer the memory-efficient kernel."""
    _check(q, k, v, key_padding_mask, causal)
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)
    visible = _visibility(q, k, key_padding_mask, causal)
    with sdpa_kernel(MASKED_BACKEND_PRIORITY, set_priority=True):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, dropout_p=dropout_p)
    # SDPA's result for a row with no visible key differs between backends (NaN or zeros)
    return out.masked_fill(~visible.any(dim=-1, keepdim=True), 0.0)


attention_op = define_op("attention", attention_ref)
attention_op.register("torch", attention_sdpa, devices=("cpu", "cuda"))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention through the selected backend (see :mod:`blip_fast.ops.registry`)."""
    return attention_op(q, k, v, key_padding_mask, causal, dropout_p)


def _random_lengths(batch: int, length: int, generator: torch.Generator, minimum: int = 1) -> torch.Tensor:
    return torch.randint(min(minimum, length), length + 1, (batch,), generator=generator)


def _qkv_case(batch, heads, lq, lk, dim, mask, causal, fully_masked_row=False):
    def make(device, dtype, generator):
        def t(length):
            return torch.randn(batch, heads, length, dim, generator=generator).to(device, dtype)

        q, k, v = t(lq), t(lk), t(lk)
        key_padding_mask = None
        if mask:
            lengths = _random_lengths(batch, lk, generator, minimum=8)
            key_padding_mask = torch.arange(lk)[None, :] < lengths[:, None]
            if fully_masked_row:
                key_padding_mask[0] = False
            key_padding_mask = key_padding_mask.to(device)
        return (q, k, v, key_padding_mask, causal), {}

    return make


def _register_parity_cases() -> None:
    # (mode, B, Lq, Lk, mask, causal): the BLIP base shapes of docs/results-format.md, plus odd lengths.
    image, image_384, text, caption = IMAGE_TOKENS_224, IMAGE_TOKENS_384, FINETUNE_TEXT_LENGTH, PRETRAIN_TEXT_LENGTH
    cases = [
        ("vit_bidirectional", 8, image, image, False, False),
        ("vit_bidirectional_384", 2, image_384, image_384, False, False),
        ("text_bidirectional", 32, text, text, True, False),
        ("text_bidirectional_odd", 7, 13, 13, True, False),
        ("text_causal", 32, text, text, True, True),
        ("text_causal_nomask", 32, caption, caption, False, True),
        ("cross_text_to_image", 32, text, image, False, False),
        ("cross_answer_to_question", 16, 7, text, True, False),
    ]
    for mode, b, lq, lk, mask, causal in cases:
        attention_op.parity_cases.append(
            ParityCase(
                mode=mode,
                shape=f"B{b} H{BASE_HEADS} Lq{lq} Lk{lk} D{HEAD_DIM}",
                make_inputs=_qkv_case(b, BASE_HEADS, lq, lk, HEAD_DIM, mask, causal),
                grad_argnums=(0, 1, 2),
            )
        )


_register_parity_cases()
