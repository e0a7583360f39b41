"""Attention of a decoding step: a few queries per key/value row, against a long run of keys. Triton kernels (split
keys, then a combine), host function, reference.

Generation (blip_fast.models.generation) feeds the decoder one token a step. Its self-attention is then one query
per row against that row's cached tokens, and its cross-attention is the ``S`` rows that share an image (3 beams,
or the captions sampled per image) stacked as ``S`` queries against the image's 577 tokens, held once
(``KVCache.shared_by``). A flash-attention kernel tiles queries by 64 or 128 rows, so such a call fills a few
percent of each tile and runs one program per (row, head), each walking every key. Here a program takes a block of
at most 16 queries (a decoding step has fewer: no padding to 64) and one *split* of the keys; when the rows and
heads alone give too few programs to fill the GPU, the keys are split across more of them
(flash-decoding), and a second kernel merges the splits' partial softmaxes (each split's max, sum and weighted
values) into the output. With one split the first kernel writes the output itself.

Contract (that of ``ops.attention`` without causality or dropout): ``q`` (B, H, M, D), ``k`` and ``v`` (B, H, N, D),
any strides; ``key_padding_mask`` (B, N) bool, True where a key may be seen (any strides: the static decode step's
mask is one row broadcast), or None. Scores are scaled by ``1/sqrt(D)``; masked keys are excluded exactly; a query
with no key to see returns zeros. The kernels read q, k, v in their dtype (fp32, fp16, bf16), multiply with fp32
accumulation (fp32 in IEEE precision, not TF32), keep the softmax in fp32, and return q's dtype. Inference only:
there is no backward, and the host function refuses inputs that would need one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import KERNEL_DTYPES, device_scope, dot_precision, sm_count

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the package and its CPU paths work without triton
    HAS_TRITON = False


@dataclass(frozen=True)
class DecodeTiling:
    """Keys per tile and programs to aim for per SM (the split rule). Not yet timed on a GPU: 64 keys is the
    flash-decoding default for head dim 64, and two programs per SM leave room for one to wait on memory."""

    block_n: int = 64
    programs_per_sm: int = 2
    num_warps: int = 4


DEFAULT_TILING = DecodeTiling()
# queries per program: a decoding step has 1 (self-attention) to a few dozen (cross-attention of an image's rows in
# the prompt's step); tl.dot needs 16 rows at least, so 16 wastes least
BLOCK_M = 16


def decode_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention in ``promote_types(dtype, float32)``, masked keys excluded, rows with no key zeros."""
    check_inputs(q, k, v, key_padding_mask, allow_float64=True)
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if key_padding_mask is not None:
        visible = key_padding_mask[:, None, None, :]
        scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if key_padding_mask is not None:
        probs = probs.masked_fill(~visible.any(dim=-1, keepdim=True), 0.0)
    return torch.matmul(probs, v.to(compute)).to(q.dtype)


def check_inputs(q, k, v, key_padding_mask, allow_float64: bool = False) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"decode attention expects (B, H, L, D) tensors; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"decode attention shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    dtypes = KERNEL_DTYPES + ((torch.float64,) if allow_float64 else ())
    if q.dtype not in dtypes or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"decode attention takes q, k, v of one dtype among {', '.join(map(str, dtypes))}; "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                         or key_padding_mask.shape != (k.shape[0], k.shape[2])):
        raise ValueError(f"key_padding_mask must be bool (B, N) = {(k.shape[0], k.shape[2])}; "
                         f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")


def refuse_gradients(*tensors: torch.Tensor) -> None:
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise ValueError("decode attention has no backward: call it under torch.no_grad() (generation does), or "
                         "use ops.attention where gradients are needed")


if HAS_TRITON:

    @triton.jit
    def _split_kernel(
        q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, part_ptr, stats_ptr,
        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        stride_mb, stride_mn, stride_ob, stride_oh, stride_om,
        heads, queries, keys, head_dim, scale, keys_per_split,
        HAS_MASK: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One program per (row x head, query block, key split): an online softmax over the split's key tiles.
        ``SPLIT``: write the unnormalised partial (its max, sum and weighted values) for :func:`_combine_kernel`;
        otherwise (one split) the output."""
        row_head, block, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, h = row_head // heads, row_head % heads
        m_offs = block * BLOCK_M + tl.arange(0, BLOCK_M)
        d_offs = tl.arange(0, BLOCK_D)
        m_ok, d_ok = m_offs < queries, d_offs < head_dim
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + m_offs[:, None] * stride_qm + d_offs[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        start = split * keys_per_split
        stop = tl.minimum(start + keys_per_split, keys)
        row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        row_sum = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for tile in range(start, stop, BLOCK_N):
            n_offs = tile + tl.arange(0, BLOCK_N)
            visible = n_offs < stop
            if HAS_MASK:
                visible &= tl.load(mask_ptr + b * stride_mb + n_offs * stride_mn, mask=visible, other=0) != 0
            tile_ok = visible[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + b * stride_kb + h * stride_kh + n_offs[:, None] * stride_kn + d_offs[None, :],
                        mask=tile_ok, other=0.0)
            v = tl.load(v_ptr + b * stride_vb + h * stride_vh + n_offs[:, None] * stride_vn + d_offs[None, :],
                        mask=tile_ok, other=0.0)
            s = tl.where(visible[None, :], tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(s, axis=1))
            # a row that has seen no visible key yet keeps max -inf: subtract 0 instead (its p and rescale are 0)
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            p = tl.exp(s - shift[:, None])
            rescale = tl.exp(row_max - shift)
            row_sum = row_sum * rescale + tl.sum(p, axis=1)
            acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            row_max = new_max
        if SPLIT:
            # partials laid out (row x head, split, query) so the combine reads one split's rows at a time
            at = (row_head * tl.num_programs(2) + split) * queries + m_offs
            tl.store(stats_ptr + 2 * at, row_max, mask=m_ok)
            tl.store(stats_ptr + 2 * at + 1, row_sum, mask=m_ok)
            tl.store(part_ptr + at[:, None] * head_dim + d_offs[None, :], acc, mask=m_ok[:, None] & d_ok[None, :])
        else:
            out = acc / tl.where(row_sum > 0.0, row_sum, 1.0)[:, None]
            tl.store(out_ptr + b * stride_ob + h * stride_oh + m_offs[:, None] * stride_om + d_offs[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _combine_kernel(
        part_ptr, stats_ptr, out_ptr, stride_ob, stride_oh, stride_om,
        heads, queries, head_dim, splits,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One program per (row x head, query block): the splits' partial softmaxes merged in split order (the
        result does not depend on how programs were scheduled), normalised, in the output's dtype."""
        row_head, block = tl.program_id(0), tl.program_id(1)
        b, h = row_head // heads, row_head % heads
        m_offs = block * BLOCK_M + tl.arange(0, BLOCK_M)
        d_offs = tl.arange(0, BLOCK_D)
        m_ok, d_ok = m_offs < queries, d_offs < head_dim
        row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        row_sum = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for split in range(0, splits):
            at = (row_head * splits + split) * queries + m_offs
            split_max = tl.load(stats_ptr + 2 * at, mask=m_ok, other=float("-inf"))
            split_sum = tl.load(stats_ptr + 2 * at + 1, mask=m_ok, other=0.0)
            part = tl.load(part_ptr + at[:, None] * head_dim + d_offs[None, :], mask=m_ok[:, None] & d_ok[None, :],
                           other=0.0)
            new_max = tl.maximum(row_max, split_max)
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            mine, theirs = tl.exp(row_max - shift), tl.exp(split_max - shift)
            row_sum = row_sum * mine + split_sum * theirs
            acc = acc * mine[:, None] + part * theirs[:, None]
            row_max = new_max
        out = acc / tl.where(row_sum > 0.0, row_sum, 1.0)[:, None]
        tl.store(out_ptr + b * stride_ob + h * stride_oh + m_offs[:, None] * stride_om + d_offs[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def key_splits(programs: int, device: torch.device, tiling: DecodeTiling = DEFAULT_TILING) -> int:
    """How many key splits ``programs`` (row x head x query block) programs get: enough to reach
    ``programs_per_sm`` per SM (the host function caps them at the key tiles)."""
    return triton.cdiv(tiling.programs_per_sm * sm_count(device), max(programs, 1))


def decode_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             key_padding_mask: torch.Tensor | None = None, splits: int | None = None,
                             tiling: DecodeTiling = DEFAULT_TILING) -> torch.Tensor:
    """The kernels' attention (module docstring); ``splits`` key splits (None: :func:`key_splits`'s choice)."""
    check_inputs(q, k, v, key_padding_mask)
    refuse_gradients(q, k, v)
    rows, heads, queries, head_dim = q.shape
    keys = k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:  # the kernels step along D by one element
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    blocks = triton.cdiv(queries, BLOCK_M)
    if splits is None:
        splits = key_splits(rows * heads * blocks, q.device, tiling)
    # whole tiles per split, so that no split is empty: never more splits than tiles, whatever was asked
    keys_per_split = triton.cdiv(triton.cdiv(max(keys, 1), max(splits, 1)), tiling.block_n) * tiling.block_n
    splits = triton.cdiv(max(keys, 1), keys_per_split)
    mask = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else q  # q: never read
    stride_mask = key_padding_mask.stride() if key_padding_mask is not None else (0, 0)
    split = splits > 1
    part = (torch.empty(rows * heads * splits * queries, head_dim, dtype=torch.float32, device=q.device) if split
            else out)
    stats = (torch.empty(rows * heads * splits * queries * 2, dtype=torch.float32, device=q.device) if split
             else out)
    block_d = max(16, triton.next_power_of_2(head_dim))
    with device_scope(q):
        _split_kernel[(rows * heads, blocks, splits)](
            q, k, v, mask, out, part, stats,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), *stride_mask, out.stride(0), out.stride(1), out.stride(2),
            heads, queries, keys, head_dim, 1.0 / math.sqrt(head_dim), keys_per_split,
            HAS_MASK=key_padding_mask is not None, SPLIT=split, PRECISION=dot_precision(q.dtype),
            BLOCK_M=BLOCK_M, BLOCK_N=tiling.block_n, BLOCK_D=block_d, num_warps=tiling.num_warps,
        )
        if split:
            _combine_kernel[(rows * heads, blocks)](
                part, stats, out, out.stride(0), out.stride(1), out.stride(2), heads, queries, head_dim, splits,
                BLOCK_M=BLOCK_M, BLOCK_D=block_d, num_warps=tiling.num_warps,
            )
    return out

