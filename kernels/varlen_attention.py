"""Attention over packed variable-length sequences, with dropout: Triton kernels, host functions, reference.

Pretraining carries its captions packed (blip_fast.models.packing): (T, hidden) for the T real
tokens. torch's fused attention wants (B, H, L, D), so every text attention unpacks its queries,
keys and values into the padded layout and packs its output again, and attends over the padding.
torch's own variable-length attention (``varlen_attn``) has no dropout, which BLIP's text attention
needs (0.1 on the probabilities). These kernels attend on the packed rows directly, FlashAttention-2
style (online softmax forward; backward recomputes the probabilities from the saved log-sum-exp),
in BLIP's three modes: bidirectional, causal, and cross-attention to another tensor's rows.

What attends to what is a table of *sequences* (:class:`AttentionSequences`): sequence s is the
query rows ``q_start[s] : q_start[s] + q_len[s]`` of ``q`` (T_q, H, D), and it attends to the key
and value rows of its *group* ``g = kv_group[s]``: ``kv_start[g] : kv_start[g] + kv_len[g]`` of ``k``
and ``v`` (T_k, H, D). Self-attention gives each sequence its own group over the same rows;
cross-attention lets several sequences share a group, as pretraining's ITM rows share their image's
tokens, so nothing is copied per row. Causal masking aligns query i of a sequence with key i of its
group. A query with no key to see returns zeros; query rows that no sequence covers are zeros too.

Backward, as FlashAttention-2: one kernel per key block accumulates dK and dV over every query of
every sequence of the group (``group_sequences[group_offsets[g] : group_offsets[g + 1]]``, the
sequences sorted by group), another per query block accumulates dQ. Each output element is written
by one program: no atomics, and the gradients are deterministic. Hence the contract: **no two groups
share a key row** (self-attention with ``kv_len <= q_len``, as packed captions and dense rows have;
cross-attention groups are distinct images). Where groups overlap, the programs of each write the
shared rows' dK and dV and the last one wins (seen on the H100: the reference sums them). Checking
it would cost a host synchronisation, so only the reference does.

Dropout draws Philox numbers (``tl.rand``) from a seed read on the device (so a CUDA graph replays
with a new seed each step, drawn by torch's generator) and the offset ``(h * T_q + query row) *
max_kv_len + key position``; the backward draws the same ones. :func:`dropout_keep` writes that mask
out in the padded layout for tests.

The kernels read q, k, v in their dtype (fp32, fp16, bf16), multiply in it with fp32 accumulation
(fp32 inputs in IEEE precision, not TF32) and keep the softmax statistics in fp32.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import KERNEL_DTYPES

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the package and its CPU paths work without triton
    HAS_TRITON = False

# Query x key rows per block on the GPU, by causal: the fastest of the blocks timed at BLIP's shapes on an H100
# (benchmarks/results/kernels-h100-20261123-attention.json, forward + backward, bf16; docs/benchmarks.md): 32 x 64
# for bidirectional text and for ITM's cross-attention to the image tokens; 32 x 32 for causal text, whose short
# captions leave most of a 64-row block's triangle masked.
BLOCKS = {False: (32, 64), True: (32, 32)}
# Sequences and key groups of at most this many rows (captions: 30 tokens in pretraining, 35 in fine-tuning) take the
# single-tile kernels: one program per sequence (forward) or key group (backward) holds its queries and keys whole,
# so there is no online softmax, no separate delta pass, and dQ, dK, dV come from one program. Not yet timed on a GPU.
MAX_TILE = 64
TILE_WARPS = 4
# The single-tile kernels' CAUSAL for a table whose sequences are each causal or not (the joint ITM/LM pass: ITM's
# rows bidirectional, LM's causal, in one launch); 0 and 1 are all bidirectional and all causal.
PER_SEQUENCE = tl.constexpr(2) if HAS_TRITON else 2


class AttentionSequences(NamedTuple):
    """Which query rows attend to which key/value rows. Index tensors int32, on the inputs' device."""

    q_start: torch.Tensor
    """(S,) first query row of each sequence."""
    q_len: torch.Tensor
    """(S,) query rows of each sequence."""
    kv_group: torch.Tensor
    """(S,) the key/value group each sequence attends to."""
    kv_start: torch.Tensor
    """(G,) first key/value row of each group."""
    kv_len: torch.Tensor
    """(G,) key/value rows of each group."""
    group_sequences: torch.Tensor
    """(S,) the sequences ordered by group (stably): group g's are ``group_offsets[g]:group_offsets[g + 1]``."""
    group_offsets: torch.Tensor
    """(G + 1,) where each group's sequences start in ``group_sequences``."""
    max_q_len: int
    """An upper bound of ``q_len`` (host): the launch grid. Nothing is read past a sequence's own length."""
    max_kv_len: int
    """An upper bound of ``kv_len`` (host): the grid, and the stride of the dropout offsets."""

    @classmethod
    def self_attention(cls, starts: torch.Tensor, q_len: torch.Tensor, kv_len: torch.Tensor, max_len: int
                       ) -> AttentionSequences:
        """Each sequence attends to its own rows: queries ``starts[s] + [0, q_len[s])``, keys ``starts[s] + [0,
        kv_len[s])`` (a caption with padding rows kept, as dense rows are, has kv_len < q_len)."""
        index = torch.arange(starts.shape[0], dtype=torch.int32, device=starts.device)
        return cls(_int32(starts), _int32(q_len), index, _int32(starts), _int32(kv_len), index,
                   torch.arange(starts.shape[0] + 1, dtype=torch.int32, device=starts.device), max_len, max_len)

    @classmethod
    def grouped(cls, q_start: torch.Tensor, q_len: torch.Tensor, kv_group: torch.Tensor, kv_start: torch.Tensor,
                kv_len: torch.Tensor, max_q_len: int, max_kv_len: int) -> AttentionSequences:
        """Sequences sharing key/value groups (cross-attention); the group index is built on the device, with no
        host synchronisation (a stable sort and a search)."""
        groups = kv_start.shape[0]
        order = torch.sort(kv_group.long(), stable=True)
        offsets = torch.searchsorted(order.values, torch.arange(groups + 1, device=kv_group.device))
        return cls(_int32(q_start), _int32(q_len), _int32(kv_group), _int32(kv_start), _int32(kv_len),
                   _int32(order.indices), _int32(offsets), max_q_len, max_kv_len)

    @classmethod
    def concat(cls, tables: list[AttentionSequences], row_counts: list[int]) -> AttentionSequences:
        """Self-attention tables over consecutive blocks of rows (``row_counts[i]`` rows for ``tables[i]``, queries
        and keys alike) as one table: each one's rows, groups and sequences shifted past those before it."""
        if len(tables) != len(row_counts):
            raise ValueError(f"{len(tables)} tables for {len(row_counts)} row counts")
        parts = {name: [] for name in cls._fields[:7]}
        rows = groups = sequences = 0
        for table, count in zip(tables, row_counts, strict=True):
            parts["q_start"].append(table.q_start + rows)
            parts["q_len"].append(table.q_len)
            parts["kv_group"].append(table.kv_group + groups)
            parts["kv_start"].append(table.kv_start + rows)
            parts["kv_len"].append(table.kv_len)
            parts["group_sequences"].append(table.group_sequences + sequences)
            parts["group_offsets"].append(table.group_offsets[:-1] + sequences)
            rows, groups, sequences = rows + count, groups + table.kv_start.shape[0], sequences + table.q_len.shape[0]
        parts["group_offsets"].append(tables[-1].group_offsets[-1:] + sequences - tables[-1].q_len.shape[0])
        return cls(*(_int32(torch.cat(parts[name])) for name in cls._fields[:7]),
                   max(t.max_q_len for t in tables), max(t.max_kv_len for t in tables))

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(self[:7])


def _int32(t: torch.Tensor) -> torch.Tensor:
    """The kernels read the table's entries at ``pointer + index``: contiguous int32 (a view of a wider table, e.g. a
    column, would be read at the wrong places)."""
    return t.to(torch.int32).contiguous()


def check_inputs(q, k, v, seqs: AttentionSequences, dropout_p: float, allow_float64: bool = False) -> None:
    """Raise ValueError unless (q, k, v, seqs) make a valid call (shapes, dtypes, devices, strides)."""
    where = "varlen_attention"
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"{where} expects (T, H, D) tensors; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[1:] != k.shape[1:]:
        raise ValueError(f"{where}: shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    dtypes = KERNEL_DTYPES + ((torch.float64,) if allow_float64 else ())
    if q.dtype not in dtypes or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{where}: q, k, v must share one of {', '.join(map(str, dtypes))}; "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if any(t.device != q.device for t in (k, v, *seqs.tensors)):
        raise ValueError(f"{where}: inputs and sequence table must be on one device")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError(f"{where}: the head dimension of q, k, v must be contiguous")
    sequences, groups = seqs.q_start.shape[0], seqs.kv_start.shape[0]
    shapes = [t.shape for t in seqs.tensors]
    if shapes != [(sequences,)] * 3 + [(groups,)] * 2 + [(sequences,), (groups + 1,)]:
        raise ValueError(f"{where}: sequence table shapes {shapes} do not fit {sequences} sequences, {groups} groups")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{where}: dropout_p must be in [0, 1); got {dropout_p}")
    if any(not t.is_contiguous() or t.dtype != torch.int32 for t in seqs.tensors):
        raise ValueError(f"{where}: the sequence table must hold contiguous int32 tensors (AttentionSequences' "
                         "constructors make them)")
    if dropout_p > 0.0 and q.shape[1] * max(q.shape[0], 1) * max(seqs.max_kv_len, 1) >= 2**31:
        raise ValueError(f"{where}: dropout offsets of {q.shape[1]} heads x {q.shape[0]} rows x {seqs.max_kv_len} keys "
                         "exceed 32 bits")


def check_groups_disjoint(seqs: AttentionSequences) -> None:
    """Raise ValueError where two key/value groups share a row, against the kernels' contract (module docstring).
    It reads the table on the host, so the reference checks it and the kernels do not."""
    spans = sorted((start, start + length) for start, length
                   in zip(seqs.kv_start.tolist(), seqs.kv_len.tolist(), strict=True) if length > 0)
    for (start, end), (next_start, next_end) in itertools.pairwise(spans):
        if next_start < end:
            raise ValueError(f"varlen_attention: key/value groups overlap (rows {start}:{end} and "
                             f"{next_start}:{next_end}); the kernels need each key row in one group")


def _dense_index(start: torch.Tensor, length: torch.Tensor, max_len: int, outside: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, max_len) row index of each padded position (``outside`` past its sequence's end) and whether it is inside
    its sequence."""
    positions = torch.arange(max_len, device=start.device)
    inside = positions[None, :] < length[:, None].long()
    return torch.where(inside, start[:, None].long() + positions[None, :], outside), inside


def varlen_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: AttentionSequences,
                         causal: bool | torch.Tensor = False, dropout_p: float = 0.0, keep: torch.Tensor | None = None
                         ) -> torch.Tensor:
    """Reference: each sequence gathered into the padded layout, softmax attention in ``promote_types(dtype,
    float32)``, scattered back. ``causal``: every sequence's mode, or a bool tensor (S,) of each one's. ``keep``
    (S, H, max_q_len, max_kv_len) bool is the dropout mask to apply (tests pass the kernels' own,
    :func:`dropout_keep`); without it dropout draws from torch's generator."""
    check_inputs(q, k, v, seqs, dropout_p, allow_float64=True)
    check_groups_disjoint(seqs)
    compute = torch.promote_types(q.dtype, torch.float32)
    # positions past a sequence's end read an appended zero row (there is one even where q or k has no rows)
    q_rows, q_inside = _dense_index(seqs.q_start, seqs.q_len, seqs.max_q_len, q.shape[0])
    group = seqs.kv_group.long()
    k_rows, k_inside = _dense_index(seqs.kv_start[group], seqs.kv_len[group], seqs.max_kv_len, k.shape[0])
    qd, kd, vd = (torch.cat([t.to(compute), t.new_zeros(1, *t.shape[1:], dtype=compute)])[rows].transpose(1, 2)
                  for t, rows in ((q, q_rows), (k, k_rows), (v, k_rows)))
    scores = torch.matmul(qd, kd.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (S, H, Lq, Lk)
    visible = k_inside[:, None, None, :]
    lower = torch.ones(seqs.max_q_len, seqs.max_kv_len, dtype=torch.bool, device=q.device).tril()
    if isinstance(causal, torch.Tensor):
        visible = visible & (lower | ~causal.bool()[:, None, None, None])
    elif causal:
        visible = visible & lower
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).masked_fill(~visible.any(dim=-1, keepdim=True), 0.0)
    if dropout_p > 0.0:
        probs = probs * keep / (1 - dropout_p) if keep is not None else F.dropout(probs, p=dropout_p)
    out = torch.matmul(probs, vd).transpose(1, 2)  # (S, Lq, H, D)
    result = q.new_zeros(q.shape, dtype=compute)
    result = result.index_put((q_rows[q_inside],), out[q_inside])
    return result.to(q.dtype)


if HAS_TRITON:

    @triton.jit
    def _keep(seed, h, q_rows, n_offs, total_q, max_kv_len, dropout_p):
        """Whether each (query row, key position) of head h keeps its probability: the offsets of the docstring."""
        offsets = (h * total_q + q_rows)[:, None] * max_kv_len + n_offs[None, :]
        return tl.rand(seed, offsets) >= dropout_p

    @triton.jit
    def _tile(ptr, rows, stride_t, h, stride_h, d_offs):
        """Pointers to head h of ``rows`` (a block of row indices) of a (T, H, D) tensor: (rows, BLOCK_D). The row
        offset is 64-bit: the image keys of a large batch (rows x row stride) pass 2^31 elements."""
        return ptr + rows.to(tl.int64)[:, None] * stride_t + h * stride_h + d_offs[None, :]

    @triton.jit
    def _query_block(heads, q_start_ptr, q_len_ptr, kv_group_ptr, kv_start_ptr, kv_len_ptr, head_dim,
                     CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """The query block of a program over (query block, sequence x head): its head, whether the block holds any
        query of the sequence, positions in the sequence, their mask, rows, the head columns and their mask, and
        its group's keys: first row, count, and the end of those it may see (causal)."""
        pid_m = tl.program_id(0)
        seq = tl.program_id(1) // heads
        q_len = tl.load(q_len_ptr + seq)
        group = tl.load(kv_group_ptr + seq)
        kv_len = tl.load(kv_len_ptr + group)
        m_offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        d_offs = tl.arange(0, BLOCK_D)
        kv_end = kv_len
        if CAUSAL:
            kv_end = tl.minimum(kv_len, (pid_m + 1) * BLOCK_M)
        return (tl.program_id(1) % heads, pid_m * BLOCK_M < q_len, m_offs, m_offs < q_len,
                tl.load(q_start_ptr + seq) + m_offs, d_offs, d_offs < head_dim, tl.load(kv_start_ptr + group), kv_len,
                kv_end)

    @triton.jit
    def _scores(q, k_ptrs, n_offs, kv_len, m_offs, scale, CAUSAL: tl.constexpr, D_MASK, PRECISION: tl.constexpr):
        """Scaled scores (BLOCK_M, BLOCK_N) in fp32 of a query block against the key block at ``k_ptrs``, and the
        mask of the visible ones."""
        k = tl.load(k_ptrs, mask=(n_offs < kv_len)[:, None] & D_MASK[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        visible = (n_offs < kv_len)[None, :]
        if CAUSAL:
            visible = visible & (n_offs[None, :] <= m_offs[:, None])
        return s, visible

    @triton.jit
    def _forward_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, seed_ptr,
        q_start_ptr, q_len_ptr, kv_group_ptr, kv_start_ptr, kv_len_ptr,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        heads, total_q, max_kv_len, head_dim, scale, dropout_p,
        CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One program per (query block, sequence x head): online softmax over the group's key blocks."""
        h, active, m_offs, m_mask, q_rows, d_offs, d_mask, kv_start, kv_len, kv_end = _query_block(
            heads, q_start_ptr, q_len_ptr, kv_group_ptr, kv_start_ptr, kv_len_ptr, head_dim, CAUSAL, BLOCK_M, BLOCK_D)
        if active:
            q = tl.load(_tile(q_ptr, q_rows, stride_qt, h, stride_qh, d_offs), mask=m_mask[:, None] & d_mask[None, :],
                        other=0.0)
            row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
            row_sum = tl.zeros((BLOCK_M,), tl.float32)
            acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
            if DROPOUT:
                seed = tl.load(seed_ptr)
            for n in range(0, kv_end, BLOCK_N):
                n_offs = n + tl.arange(0, BLOCK_N)
                kv_rows = kv_start + n_offs
                s, visible = _scores(q, _tile(k_ptr, kv_rows, stride_kt, h, stride_kh, d_offs), n_offs, kv_len, m_offs,
                                     scale, CAUSAL, d_mask, PRECISION)
                s = tl.where(visible, s, float("-inf"))
                new_max = tl.maximum(row_max, tl.max(s, axis=1))
                # a row that has seen no visible key yet keeps max -inf: subtract 0 instead (its p are all 0)
                safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
                p = tl.exp(s - safe_max[:, None])
                correction = tl.exp(row_max - safe_max)
                row_sum = row_sum * correction + tl.sum(p, axis=1)
                if DROPOUT:
                    keep = _keep(seed, h, q_rows, n_offs, total_q, max_kv_len, dropout_p)
                    p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
                v = tl.load(_tile(v_ptr, kv_rows, stride_vt, h, stride_vh, d_offs),
                            mask=(n_offs < kv_len)[:, None] & d_mask[None, :], other=0.0)
                acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
                row_max = new_max
            has_keys = row_sum > 0.0
            out = acc / tl.where(has_keys, row_sum, 1.0)[:, None]
            tl.store(_tile(out_ptr, q_rows, stride_ot, h, stride_oh, d_offs), out.to(out_ptr.dtype.element_ty),
                     mask=m_mask[:, None] & d_mask[None, :])
            # +inf for a row with no key: the backward's exp(s - lse) is then 0 everywhere
            lse = tl.where(has_keys, row_max + tl.log(row_sum), float("inf"))
            tl.store(lse_ptr + h * total_q + q_rows, lse, mask=m_mask)

    @triton.jit
    def _delta_kernel(out_ptr, grad_ptr, delta_ptr, stride_ot, stride_oh, stride_gt, stride_gh, heads, total_q,
                      head_dim, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] (the softmax backward's row term), in fp32."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        h = tl.program_id(1)
        d_offs = tl.arange(0, BLOCK_D)
        mask = (rows < total_q)[:, None] & (d_offs < head_dim)[None, :]
        o = tl.load(_tile(out_ptr, rows, stride_ot, h, stride_oh, d_offs), mask=mask, other=0.0)
        g = tl.load(_tile(grad_ptr, rows, stride_gt, h, stride_gh, d_offs), mask=mask, other=0.0)
        tl.store(delta_ptr + h * total_q + rows, tl.sum(o.to(tl.float32) * g.to(tl.float32), axis=1),
                 mask=rows < total_q)

    @triton.jit
    def _probabilities(q, k_ptrs, n_offs, kv_len, m_offs, m_mask, lse, scale, CAUSAL: tl.constexpr, d_mask,
                       PRECISION: tl.constexpr):
        """The forward's softmax probabilities of a (query block, key block) tile, recomputed from the lse."""
        s, visible = _scores(q, k_ptrs, n_offs, kv_len, m_offs, scale, CAUSAL, d_mask, PRECISION)
        return tl.where(visible & m_mask[:, None], tl.exp(s - lse[:, None]), 0.0)

    @triton.jit
    def _key_gradients(p, q, v, g, delta, seed, h, q_rows, n_offs, total_q, max_kv_len, dropout_p,
                       DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
        """A (query block, key block) tile's backward from its probabilities ``p`` and the output gradient ``g``:
        the scores' gradient dS (before the scale), and the tile's shares of dV and dK, dropout applied as the
        forward drew it."""
        dp = tl.dot(g, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            keep = _keep(seed, h, q_rows, n_offs, total_q, max_kv_len, dropout_p)
            p_used = tl.where(keep, p / (1.0 - dropout_p), 0.0)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        else:
            p_used = p
        ds = p * (dp - delta[:, None])
        return (ds, tl.dot(tl.trans(p_used.to(g.dtype)), g, input_precision=PRECISION),
                tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION))

    @triton.jit
    def _grad_kv_kernel(
        q_ptr, k_ptr, v_ptr, grad_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, seed_ptr,
        q_start_ptr, q_len_ptr, kv_start_ptr, kv_len_ptr, group_sequences_ptr, group_offsets_ptr,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_gt, stride_gh,
        stride_dkt, stride_dkh, stride_dvt, stride_dvh,
        heads, total_q, max_kv_len, head_dim, scale, dropout_p,
        CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One program per (key block, group x head): dK and dV over every query of every sequence of the group."""
        pid_n = tl.program_id(0)
        group = tl.program_id(1) // heads
        h = tl.program_id(1) % heads
        kv_len = tl.load(kv_len_ptr + group)
        if pid_n * BLOCK_N < kv_len:
            kv_start = tl.load(kv_start_ptr + group)
            n_offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = n_offs < kv_len
            d_offs = tl.arange(0, BLOCK_D)
            d_mask = d_offs < head_dim
            kv_rows = kv_start + n_offs
            kv_mask = n_mask[:, None] & d_mask[None, :]
            v = tl.load(_tile(v_ptr, kv_rows, stride_vt, h, stride_vh, d_offs), mask=kv_mask, other=0.0)
            dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
            dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
            seed = tl.load(seed_ptr)  # read by _key_gradients only with DROPOUT (the pointer is always valid)
            for member in range(tl.load(group_offsets_ptr + group), tl.load(group_offsets_ptr + group + 1)):
                seq = tl.load(group_sequences_ptr + member)
                q_start = tl.load(q_start_ptr + seq)
                q_len = tl.load(q_len_ptr + seq)
                m_first = 0
                if CAUSAL:  # queries before the block's first key see none of it
                    m_first = (pid_n * BLOCK_N) // BLOCK_M * BLOCK_M
                for m in range(m_first, q_len, BLOCK_M):
                    m_offs = m + tl.arange(0, BLOCK_M)
                    m_mask = m_offs < q_len
                    q_rows = q_start + m_offs
                    q_tile = m_mask[:, None] & d_mask[None, :]
                    q = tl.load(_tile(q_ptr, q_rows, stride_qt, h, stride_qh, d_offs), mask=q_tile, other=0.0)
                    g = tl.load(_tile(grad_ptr, q_rows, stride_gt, h, stride_gh, d_offs), mask=q_tile, other=0.0)
                    lse = tl.load(lse_ptr + h * total_q + q_rows, mask=m_mask, other=float("inf"))
                    delta = tl.load(delta_ptr + h * total_q + q_rows, mask=m_mask, other=0.0)
                    p = _probabilities(q, _tile(k_ptr, kv_rows, stride_kt, h, stride_kh, d_offs), n_offs, kv_len,
                                       m_offs, m_mask, lse, scale, CAUSAL, d_mask, PRECISION)
                    ds, dv_part, dk_part = _key_gradients(p, q, v, g, delta, seed, h, q_rows, n_offs, total_q,
                                                          max_kv_len, dropout_p, DROPOUT, PRECISION)
                    dv += dv_part
                    dk += dk_part
            tl.store(_tile(dk_ptr, kv_rows, stride_dkt, h, stride_dkh, d_offs),
                     (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
            tl.store(_tile(dv_ptr, kv_rows, stride_dvt, h, stride_dvh, d_offs), dv.to(dv_ptr.dtype.element_ty),
                     mask=kv_mask)

    @triton.jit
    def _grad_q_kernel(
        q_ptr, k_ptr, v_ptr, grad_ptr, lse_ptr, delta_ptr, dq_ptr, seed_ptr,
        q_start_ptr, q_len_ptr, kv_group_ptr, kv_start_ptr, kv_len_ptr,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_gt, stride_gh,
        stride_dqt, stride_dqh,
        heads, total_q, max_kv_len, head_dim, scale, dropout_p,
        CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One program per (query block, sequence x head): dQ over the group's key blocks."""
        h, active, m_offs, m_mask, q_rows, d_offs, d_mask, kv_start, kv_len, kv_end = _query_block(
            heads, q_start_ptr, q_len_ptr, kv_group_ptr, kv_start_ptr, kv_len_ptr, head_dim, CAUSAL, BLOCK_M, BLOCK_D)
        if active:
            q_tile = m_mask[:, None] & d_mask[None, :]
            q = tl.load(_tile(q_ptr, q_rows, stride_qt, h, stride_qh, d_offs), mask=q_tile, other=0.0)
            g = tl.load(_tile(grad_ptr, q_rows, stride_gt, h, stride_gh, d_offs), mask=q_tile, other=0.0)
            lse = tl.load(lse_ptr + h * total_q + q_rows, mask=m_mask, other=float("inf"))
            delta = tl.load(delta_ptr + h * total_q + q_rows, mask=m_mask, other=0.0)
            dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
            if DROPOUT:
                seed = tl.load(seed_ptr)
            for n in range(0, kv_end, BLOCK_N):
                n_offs = n + tl.arange(0, BLOCK_N)
                kv_rows = kv_start + n_offs
                k_ptrs = _tile(k_ptr, kv_rows, stride_kt, h, stride_kh, d_offs)
                p = _probabilities(q, k_ptrs, n_offs, kv_len, m_offs, m_mask, lse, scale, CAUSAL, d_mask, PRECISION)
                v = tl.load(_tile(v_ptr, kv_rows, stride_vt, h, stride_vh, d_offs),
                            mask=(n_offs < kv_len)[:, None] & d_mask[None, :], other=0.0)
                dp = tl.dot(g, tl.trans(v), input_precision=PRECISION)
                if DROPOUT:
                    keep = _keep(seed, h, q_rows, n_offs, total_q, max_kv_len, dropout_p)
                    dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
                ds = p * (dp - delta[:, None])
                k = tl.load(k_ptrs, mask=(n_offs < kv_len)[:, None] & d_mask[None, :], other=0.0)
                dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
            tl.store(_tile(dq_ptr, q_rows, stride_dqt, h, stride_dqh, d_offs), (dq * scale).to(dq_ptr.dtype.element_ty),
                     mask=q_tile)

    @triton.jit
    def _whole_tile(ptr, start, length, stride_t, h, stride_h, d_offs, d_mask, TILE: tl.constexpr):
        """Rows ``start + [0, length)`` of head h of a (T, H, D) tensor as one (TILE, BLOCK_D) tile, zero past the
        end, and the mask of its rows."""
        offs = tl.arange(0, TILE)
        mask = offs < length
        return tl.load(_tile(ptr, start + offs, stride_t, h, stride_h, d_offs), mask=mask[:, None] & d_mask[None, :],
                       other=0.0), mask

    @triton.jit
    def _tile_visible(n_mask, offs, seq_causal_ptr, seq, CAUSAL: tl.constexpr):
        """(TILE, TILE) keys each query of sequence ``seq`` sees: those present, and with CAUSAL (or, per sequence,
        where ``seq_causal[seq]`` says so) none after it."""
        visible = n_mask[None, :]
        if CAUSAL == PER_SEQUENCE:
            bidirectional = tl.load(seq_causal_ptr + seq) == 0
            visible = visible & ((offs[None, :] <= offs[:, None]) | bidirectional)
        elif CAUSAL:
            visible = visible & (offs[None, :] <= offs[:, None])
        return visible

    @triton.jit
    def _tile_forward_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, seed_ptr,
        q_start_ptr, q_len_ptr, kv_group_ptr, kv_start_ptr, kv_len_ptr, seq_causal_ptr,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        heads, total_q, max_kv_len, head_dim, scale, dropout_p,
        CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
        TILE: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One program per (sequence x head) whose queries and keys each fit one tile: the softmax whole, no
        online rescaling; the same dropout offsets as :func:`_forward_kernel`. ``CAUSAL``: 0 bidirectional, 1
        causal, ``PER_SEQUENCE`` each sequence as ``seq_causal`` (int8) says."""
        seq = tl.program_id(0) // heads
        h = tl.program_id(0) % heads
        group = tl.load(kv_group_ptr + seq)
        q_start = tl.load(q_start_ptr + seq)
        d_offs = tl.arange(0, BLOCK_D)
        d_mask = d_offs < head_dim
        q, m_mask = _whole_tile(q_ptr, q_start, tl.load(q_len_ptr + seq), stride_qt, h, stride_qh, d_offs, d_mask,
                                TILE)
        kv_start, kv_len = tl.load(kv_start_ptr + group), tl.load(kv_len_ptr + group)
        k, n_mask = _whole_tile(k_ptr, kv_start, kv_len, stride_kt, h, stride_kh, d_offs, d_mask, TILE)
        v, _ = _whole_tile(v_ptr, kv_start, kv_len, stride_vt, h, stride_vh, d_offs, d_mask, TILE)
        offs = tl.arange(0, TILE)
        visible = _tile_visible(n_mask, offs, seq_causal_ptr, seq, CAUSAL)
        s = tl.where(visible, tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale, float("-inf"))
        row_max = tl.max(s, axis=1)
        # a row with no visible key keeps max -inf: subtract 0 instead (its p are all 0)
        p = tl.exp(s - tl.where(row_max == float("-inf"), 0.0, row_max)[:, None])
        row_sum = tl.sum(p, axis=1)
        q_rows = q_start + offs
        if DROPOUT:
            keep = _keep(tl.load(seed_ptr), h, q_rows, offs, total_q, max_kv_len, dropout_p)
            p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        has_keys = row_sum > 0.0
        out = tl.dot(p.to(v.dtype), v, input_precision=PRECISION) / tl.where(has_keys, row_sum, 1.0)[:, None]
        tl.store(_tile(out_ptr, q_rows, stride_ot, h, stride_oh, d_offs), out.to(out_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & d_mask[None, :])
        tl.store(lse_ptr + h * total_q + q_rows, tl.where(has_keys, row_max + tl.log(row_sum), float("inf")),
                 mask=m_mask)

    @triton.jit
    def _tile_backward_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, grad_ptr, lse_ptr, dq_ptr, dk_ptr, dv_ptr, seed_ptr,
        q_start_ptr, q_len_ptr, kv_start_ptr, kv_len_ptr, group_sequences_ptr, group_offsets_ptr, seq_causal_ptr,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_gt, stride_gh,
        stride_dqt, stride_dqh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
        heads, total_q, max_kv_len, head_dim, scale, dropout_p,
        CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
        TILE: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One program per (group x head) whose sequences and keys each fit one tile: each member sequence's dQ
        whole, and dK, dV summed over the members; the softmax row term (delta) made here from O and dO."""
        group = tl.program_id(0) // heads
        h = tl.program_id(0) % heads
        d_offs = tl.arange(0, BLOCK_D)
        d_mask = d_offs < head_dim
        kv_start, kv_len = tl.load(kv_start_ptr + group), tl.load(kv_len_ptr + group)
        k, n_mask = _whole_tile(k_ptr, kv_start, kv_len, stride_kt, h, stride_kh, d_offs, d_mask, TILE)
        v, _ = _whole_tile(v_ptr, kv_start, kv_len, stride_vt, h, stride_vh, d_offs, d_mask, TILE)
        offs = tl.arange(0, TILE)
        dk = tl.zeros((TILE, BLOCK_D), tl.float32)
        dv = tl.zeros((TILE, BLOCK_D), tl.float32)
        seed = tl.load(seed_ptr)  # read by _key_gradients only with DROPOUT (the pointer is always valid)
        for member in range(tl.load(group_offsets_ptr + group), tl.load(group_offsets_ptr + group + 1)):
            seq = tl.load(group_sequences_ptr + member)
            q_start, q_len = tl.load(q_start_ptr + seq), tl.load(q_len_ptr + seq)
            q, m_mask = _whole_tile(q_ptr, q_start, q_len, stride_qt, h, stride_qh, d_offs, d_mask, TILE)
            g, _ = _whole_tile(grad_ptr, q_start, q_len, stride_gt, h, stride_gh, d_offs, d_mask, TILE)
            o, _ = _whole_tile(out_ptr, q_start, q_len, stride_ot, h, stride_oh, d_offs, d_mask, TILE)
            q_rows = q_start + offs
            lse = tl.load(lse_ptr + h * total_q + q_rows, mask=m_mask, other=float("inf"))
            delta = tl.sum(o.to(tl.float32) * g.to(tl.float32), axis=1)
            visible = _tile_visible(n_mask, offs, seq_causal_ptr, seq, CAUSAL) & m_mask[:, None]
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            p = tl.where(visible, tl.exp(s - lse[:, None]), 0.0)
            ds, dv_part, dk_part = _key_gradients(p, q, v, g, delta, seed, h, q_rows, offs, total_q, max_kv_len,
                                                  dropout_p, DROPOUT, PRECISION)
            dv += dv_part
            dk += dk_part
            dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * scale
            tl.store(_tile(dq_ptr, q_rows, stride_dqt, h, stride_dqh, d_offs), dq.to(dq_ptr.dtype.element_ty),
                     mask=m_mask[:, None] & d_mask[None, :])
        kv_rows = kv_start + offs
        kv_tile = n_mask[:, None] & d_mask[None, :]
        tl.store(_tile(dk_ptr, kv_rows, stride_dkt, h, stride_dkh, d_offs), (dk * scale).to(dk_ptr.dtype.element_ty),
                 mask=kv_tile)
        tl.store(_tile(dv_ptr, kv_rows, stride_dvt, h, stride_dvh, d_offs), dv.to(dv_ptr.dtype.element_ty),
                 mask=kv_tile)

    @triton.jit
    def _dropout_keep_kernel(keep_ptr, seed_ptr, q_start_ptr, heads, total_q, max_q_len, max_kv_len, dropout_p,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """The keep mask of sequence s, head h, in the padded (S, H, max_q_len, max_kv_len) layout."""
        seq = tl.program_id(1) // heads
        h = tl.program_id(1) % heads
        m_offs = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        q_rows = tl.load(q_start_ptr + seq) + m_offs
        seed = tl.load(seed_ptr)
        base = keep_ptr + (tl.program_id(1) * max_q_len + m_offs)[:, None] * max_kv_len
        for n in range(0, max_kv_len, BLOCK_N):
            n_offs = n + tl.arange(0, BLOCK_N)
            keep = _keep(seed, h, q_rows, n_offs, total_q, max_kv_len, dropout_p)
            tl.store(base + n_offs[None, :], keep.to(tl.int8),
                     mask=(m_offs < max_q_len)[:, None] & (n_offs < max_kv_len)[None, :])


def _config(q: torch.Tensor, causal: bool, block_m: int | None, block_n: int | None) -> dict:
    default_m, default_n = BLOCKS[causal]
    return dict(PRECISION="ieee" if q.dtype == torch.float32 else "tf32", BLOCK_M=block_m or default_m,
                BLOCK_N=block_n or default_n, BLOCK_D=max(16, triton.next_power_of_2(q.shape[-1])))


def _seed(seed: torch.Tensor | None, device) -> torch.Tensor:
    return seed if seed is not None else torch.zeros(1, dtype=torch.int64, device=device)


def _whole_tile_size(seqs: AttentionSequences, single_tile: bool | None, causal: bool | torch.Tensor) -> int | None:
    """The tile of the single-tile kernels where they run (``single_tile`` None: wherever every sequence and key group
    fits ``MAX_TILE`` rows; always for per-sequence ``causal``), else None."""
    longest = max(seqs.max_q_len, seqs.max_kv_len, 1)
    per_sequence = isinstance(causal, torch.Tensor)
    if single_tile is None:
        single_tile = longest <= MAX_TILE or per_sequence
    if (single_tile or per_sequence) and longest > MAX_TILE:
        raise ValueError(f"varlen_attention: the single-tile kernels (and per-sequence causal masking, theirs alone) "
                         f"take sequences of at most {MAX_TILE} rows; these have up to {longest}")
    if per_sequence and not single_tile:
        raise ValueError("varlen_attention: per-sequence causal masking runs on the single-tile kernels only")
    return max(16, triton.next_power_of_2(longest)) if single_tile else None


def _causal_flags(causal: bool | torch.Tensor, seqs: AttentionSequences) -> tuple[int, torch.Tensor]:
    """The single-tile kernels' CAUSAL and their per-sequence flags (int8; unread unless CAUSAL is PER_SEQUENCE)."""
    if isinstance(causal, torch.Tensor):
        if causal.shape != seqs.q_len.shape or causal.device != seqs.q_len.device:
            raise ValueError(f"varlen_attention: per-sequence causal flags must be ({seqs.q_len.shape[0]},) on the "
                             f"table's device; got {tuple(causal.shape)} on {causal.device}")
        return int(PER_SEQUENCE), causal.to(torch.int8).contiguous()
    return int(causal), seqs.q_len  # any int tensor: never read


def varlen_attention_forward(q, k, v, seqs: AttentionSequences, causal: bool, dropout_p: float,
                             seed: torch.Tensor | None, block_m: int | None = None, block_n: int | None = None,
                             single_tile: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (T_q, H, D) in q's dtype and the log-sum-exp (H, T_q) fp32 the backward needs.

    ``seed`` (1,) int64 on the device is the dropout's Philox seed (unused without dropout). ``causal``: every
    sequence's mode, or a bool tensor (S,) of each sequence's (single-tile kernels only). ``single_tile``: the
    single-tile kernels (True), the blocked ones at ``block_m`` x ``block_n`` (False), or the former wherever every
    sequence and key group fits ``MAX_TILE`` rows (None)."""
    check_inputs(q, k, v, seqs, dropout_p)
    total_q, heads, head_dim = q.shape
    out = torch.zeros_like(q)  # rows outside every sequence stay zero (packing's filler rows)
    lse = torch.full((heads, total_q), float("inf"), dtype=torch.float32, device=q.device)
    sequences = seqs.q_start.shape[0]
    tile = _whole_tile_size(seqs, single_tile, causal)
    config = _config(q, bool(tile) or causal, block_m, block_n)  # blocks unread by the single-tile kernels
    if tile and sequences and total_q:
        mode, flags = _causal_flags(causal, seqs)
        _tile_forward_kernel[(sequences * heads,)](
            q, k, v, out, lse, _seed(seed, q.device), seqs.q_start, seqs.q_len, seqs.kv_group, seqs.kv_start,
            seqs.kv_len, flags, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), heads, total_q, seqs.max_kv_len, head_dim, 1.0 / math.sqrt(head_dim),
            dropout_p, CAUSAL=mode, DROPOUT=dropout_p > 0.0, PRECISION=config["PRECISION"], TILE=tile,
            BLOCK_D=config["BLOCK_D"], num_warps=TILE_WARPS)
    elif not tile and sequences and total_q and seqs.max_q_len:
        grid = (triton.cdiv(seqs.max_q_len, config["BLOCK_M"]), sequences * heads)
        _forward_kernel[grid](
            q, k, v, out, lse, _seed(seed, q.device), seqs.q_start, seqs.q_len, seqs.kv_group, seqs.kv_start,
            seqs.kv_len, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), heads, total_q, seqs.max_kv_len, head_dim, 1.0 / math.sqrt(head_dim),
            dropout_p, CAUSAL=causal, DROPOUT=dropout_p > 0.0, **config)
    return out, lse


def varlen_attention_backward(grad, q, k, v, out, lse, seqs: AttentionSequences, causal: bool, dropout_p: float,
                              seed: torch.Tensor | None, block_m: int | None = None, block_n: int | None = None,
                              single_tile: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q, k, v (their shapes and dtypes) given the output's gradient ``grad`` (T_q, H, D); kernels
    chosen as :func:`varlen_attention_forward`'s."""
    total_q, heads, head_dim = q.shape
    if grad.stride(-1) != 1:
        grad = grad.contiguous()
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    sequences, groups = seqs.q_start.shape[0], seqs.kv_start.shape[0]
    if not (sequences and total_q and seqs.max_q_len and seqs.max_kv_len):
        return dq, dk, dv
    tile = _whole_tile_size(seqs, single_tile, causal)
    config = _config(q, bool(tile) or causal, block_m, block_n)
    if tile:
        mode, flags = _causal_flags(causal, seqs)
        _tile_backward_kernel[(groups * heads,)](
            q, k, v, out, grad, lse, dq, dk, dv, _seed(seed, q.device), seqs.q_start, seqs.q_len, seqs.kv_start,
            seqs.kv_len, seqs.group_sequences, seqs.group_offsets, flags, q.stride(0), q.stride(1), k.stride(0),
            k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1), grad.stride(0), grad.stride(1),
            dq.stride(0), dq.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), heads, total_q,
            seqs.max_kv_len, head_dim, 1.0 / math.sqrt(head_dim), dropout_p, CAUSAL=mode, DROPOUT=dropout_p > 0.0,
            PRECISION=config["PRECISION"], TILE=tile, BLOCK_D=config["BLOCK_D"], num_warps=TILE_WARPS)
        return dq, dk, dv
    delta = torch.empty((heads, total_q), dtype=torch.float32, device=q.device)
    _delta_kernel[(triton.cdiv(total_q, config["BLOCK_M"]), heads)](
        out, grad, delta, out.stride(0), out.stride(1), grad.stride(0), grad.stride(1), heads, total_q, head_dim,
        BLOCK_M=config["BLOCK_M"], BLOCK_D=config["BLOCK_D"])
    common = dict(heads=heads, total_q=total_q, max_kv_len=seqs.max_kv_len, head_dim=head_dim,
                  scale=1.0 / math.sqrt(head_dim), dropout_p=dropout_p, CAUSAL=causal, DROPOUT=dropout_p > 0.0,
                  **config)
    seed = _seed(seed, q.device)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), grad.stride(0),
               grad.stride(1))
    _grad_kv_kernel[(triton.cdiv(seqs.max_kv_len, config["BLOCK_N"]), groups * heads)](
        q, k, v, grad, lse, delta, dk, dv, seed, seqs.q_start, seqs.q_len, seqs.kv_start, seqs.kv_len,
        seqs.group_sequences, seqs.group_offsets, *strides, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        **common)
    _grad_q_kernel[(triton.cdiv(seqs.max_q_len, config["BLOCK_M"]), sequences * heads)](
        q, k, v, grad, lse, delta, dq, seed, seqs.q_start, seqs.q_len, seqs.kv_group, seqs.kv_start, seqs.kv_len,
        *strides, dq.stride(0), dq.stride(1), **common)
    return dq, dk, dv


def dropout_keep(seqs: AttentionSequences, heads: int, total_q: int, dropout_p: float, seed: torch.Tensor,
                 block: int = 16) -> torch.Tensor:
    """The kernels' dropout mask in the padded layout (S, H, max_q_len, max_kv_len), bool (True: kept); for
    tests, which hand it to :func:`varlen_attention_ref`."""
    sequences = seqs.q_start.shape[0]
    keep = torch.empty((sequences, heads, seqs.max_q_len, seqs.max_kv_len), dtype=torch.int8, device=seed.device)
    if keep.numel():
        _dropout_keep_kernel[(triton.cdiv(seqs.max_q_len, block), sequences * heads)](
            keep, seed, seqs.q_start, heads, total_q, seqs.max_q_len, seqs.max_kv_len, dropout_p,
            BLOCK_M=block, BLOCK_N=block)
    return keep.bool()
