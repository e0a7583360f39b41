"""``LayerNorm(dropout(x) + residual)``, BERT's sublayer output, in one pass: Triton kernels, host functions,
reference.

Every sublayer of BLIP's text transformer ends the same way (``BertSelfOutput``, ``BertOutput``): the dense
projection's output ``x``, dropout, the residual added, LayerNorm. Eagerly that is three or four kernels, each
reading and writing the (rows, hidden) activations; here the forward reads ``x`` and ``residual`` once and writes the
output and two fp32 numbers per row (mean, 1/std), and the backward reads the output's gradient, ``x`` and
``residual`` once and writes their gradients, with the weight's and bias's summed per block of rows and then across
blocks in a fixed order (deterministic, no atomics). ``torch.compile`` fuses the same chain itself inside a compiled
block, so the kernels pay off on eager paths: generation's decoding steps, evaluation, training without compile.

Dropout draws Philox numbers (``tl.rand``) from a seed read on the device (a CUDA graph replays with a new seed each
step, drawn by torch's generator) at offset ``row * hidden + column``; the backward draws the same ones.
:func:`dropout_keep` writes that mask out for tests, which hand it to :func:`residual_layer_norm_ref`.

The kernels read ``x`` and ``residual`` in their dtypes (fp32, fp16, bf16), compute in fp32, and write the output in
``out_dtype`` (the op's entry chooses it as the eager chain would: fp32 under autocast, where LayerNorm runs in fp32).
Rows of up to ``MAX_HIDDEN`` columns (BERT-base: 768) are held whole, ``ROWS_PER_BLOCK`` to a program.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import KERNEL_DTYPES, device_scope

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the package and its CPU paths work without triton
    HAS_TRITON = False

MAX_HIDDEN = 8192  # a row is held whole in registers, as fp32
# rows per program, forward and backward (the backward sums the weight's and bias's gradients over them first); not
# yet tuned on a GPU
ROWS_PER_BLOCK = 4


def residual_layer_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            eps: float, dropout_p: float = 0.0, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``layer_norm(dropout(x) + residual)`` as BERT writes it; ``keep`` (bool, like ``x``) is the dropout mask to
    apply (tests pass the kernels' own, :func:`dropout_keep`); without it dropout draws from torch's generator."""
    if keep is not None:
        x = torch.where(keep, x / (1.0 - dropout_p), torch.zeros_like(x))
    elif dropout_p > 0.0:
        x = F.dropout(x, dropout_p)
    return F.layer_norm(x + residual, (x.shape[-1],), weight, bias, eps)


def check_inputs(x, residual, weight, bias, dropout_p: float) -> None:
    if x.shape != residual.shape or x.dim() < 1:
        raise ValueError(f"residual layer norm: x {tuple(x.shape)} and residual {tuple(residual.shape)} must match")
    hidden = x.shape[-1]
    if weight.shape != (hidden,) or bias.shape != (hidden,):
        raise ValueError(f"residual layer norm: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} must be "
                         f"({hidden},)")
    if hidden > MAX_HIDDEN:
        raise ValueError(f"residual layer norm: rows of {hidden} exceed the kernels' {MAX_HIDDEN}")
    for name, t in (("x", x), ("residual", residual), ("weight", weight), ("bias", bias)):
        if t.dtype not in KERNEL_DTYPES:
            raise ValueError(f"residual layer norm: {name} is {t.dtype}; the kernels take "
                             f"{', '.join(map(str, KERNEL_DTYPES))}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"residual layer norm: dropout_p must be in [0, 1); got {dropout_p}")


if HAS_TRITON:

    @triton.jit
    def _kept(seed_ptr, rows, cols, hidden, dropout_p):
        return tl.rand(tl.load(seed_ptr), rows.to(tl.int64)[:, None] * hidden + cols[None, :]) >= dropout_p

    @triton.jit
    def _summed(x_ptr, residual_ptr, seed_ptr, rows, cols, ok, hidden, dropout_p, DROPOUT: tl.constexpr):
        """``dropout(x) + residual`` of a block of rows, fp32, and the dropout's keep mask (all True without)."""
        at = rows.to(tl.int64)[:, None] * hidden + cols[None, :]
        x = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float32)
        residual = tl.load(residual_ptr + at, mask=ok, other=0.0).to(tl.float32)
        keep = ok
        if DROPOUT:
            keep = _kept(seed_ptr, rows, cols, hidden, dropout_p) & ok
            x = tl.where(keep, x / (1.0 - dropout_p), 0.0)
        return x + residual, keep

    @triton.jit
    def _forward_kernel(x_ptr, residual_ptr, weight_ptr, bias_ptr, out_ptr, stats_ptr, seed_ptr,
                        n_rows, hidden, eps, dropout_p, DROPOUT: tl.constexpr, ROWS: tl.constexpr,
                        BLOCK_N: tl.constexpr):
        """One program per ``ROWS`` rows: each row's sum, its mean and 1/std (saved, fp32), the normalised, scaled
        and shifted row."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < hidden
        row_ok = rows < n_rows
        ok = row_ok[:, None] & col_ok[None, :]
        h, _ = _summed(x_ptr, residual_ptr, seed_ptr, rows, cols, ok, hidden, dropout_p, DROPOUT)
        mean = tl.sum(h, axis=1) / hidden
        centred = tl.where(ok, h - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / hidden + eps)
        weight = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        out = centred * rstd[:, None] * weight[None, :] + bias[None, :]
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * hidden + cols[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=ok)
        tl.store(stats_ptr + 2 * rows, mean, mask=row_ok)
        tl.store(stats_ptr + 2 * rows + 1, rstd, mask=row_ok)

    @triton.jit
    def _backward_kernel(grad_ptr, x_ptr, residual_ptr, weight_ptr, stats_ptr, seed_ptr, dx_ptr, dresidual_ptr,
                         dweight_ptr, dbias_ptr, n_rows, hidden, dropout_p,
                         DROPOUT: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        """One program per ``ROWS`` rows: each row's input gradients from the recomputed normalised row, and the
        block's partial sums of the weight's and bias's gradients (one row of ``dweight``/``dbias`` per block)."""
        block = tl.program_id(0)
        rows = block * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < hidden
        row_ok = rows < n_rows
        ok = row_ok[:, None] & col_ok[None, :]
        h, keep = _summed(x_ptr, residual_ptr, seed_ptr, rows, cols, ok, hidden, dropout_p, DROPOUT)
        mean = tl.load(stats_ptr + 2 * rows, mask=row_ok, other=0.0)
        rstd = tl.load(stats_ptr + 2 * rows + 1, mask=row_ok, other=0.0)
        normalised = tl.where(ok, (h - mean[:, None]) * rstd[:, None], 0.0)
        at = rows.to(tl.int64)[:, None] * hidden + cols[None, :]
        grad = tl.load(grad_ptr + at, mask=ok, other=0.0).to(tl.float32)
        weight = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        scaled = grad * weight[None, :]
        # d/dh of (h - mean) * rstd: the scaled gradient less its mean and its projection on the normalised row
        dh = rstd[:, None] * (scaled - tl.sum(scaled, axis=1)[:, None] / hidden
                              - normalised * (tl.sum(scaled * normalised, axis=1) / hidden)[:, None])
        dh = tl.where(ok, dh, 0.0)
        tl.store(dresidual_ptr + at, dh.to(dresidual_ptr.dtype.element_ty), mask=ok)
        dx = dh
        if DROPOUT:
            dx = tl.where(keep, dh / (1.0 - dropout_p), 0.0)
        tl.store(dx_ptr + at, dx.to(dx_ptr.dtype.element_ty), mask=ok)
        tl.store(dweight_ptr + block * hidden + cols, tl.sum(grad * normalised, axis=0), mask=col_ok)
        tl.store(dbias_ptr + block * hidden + cols, tl.sum(grad, axis=0), mask=col_ok)

    @triton.jit
    def _keep_kernel(keep_ptr, seed_ptr, n_rows, hidden, dropout_p, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) + tl.arange(0, 1)
        cols = tl.arange(0, BLOCK_N)
        ok = (rows < n_rows)[:, None] & (cols < hidden)[None, :]
        keep = _kept(seed_ptr, rows, cols, hidden, dropout_p)
        tl.store(keep_ptr + rows.to(tl.int64)[:, None] * hidden + cols[None, :], keep.to(tl.int8), mask=ok)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).contiguous()


def _warps(block_n: int) -> int:
    return 4 if block_n <= 1024 else 8


def residual_layer_norm_forward(x, residual, weight, bias, eps: float, dropout_p: float, seed: torch.Tensor,
                                out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(output like ``x`` in ``out_dtype``, stats (rows, 2) fp32: each row's mean and 1/std)."""
    check_inputs(x, residual, weight, bias, dropout_p)
    hidden = x.shape[-1]
    x2, residual2 = _rows(x), _rows(residual)
    rows = x2.shape[0]
    out = torch.empty((rows, hidden), dtype=out_dtype, device=x.device)
    stats = torch.empty((rows, 2), dtype=torch.float32, device=x.device)
    if rows:
        block_n = triton.next_power_of_2(hidden)
        with device_scope(x):
            _forward_kernel[(triton.cdiv(rows, ROWS_PER_BLOCK),)](
                x2, residual2, weight, bias, out, stats, seed, rows, hidden, eps, dropout_p, DROPOUT=dropout_p > 0.0,
                ROWS=ROWS_PER_BLOCK, BLOCK_N=block_n, num_warps=_warps(block_n))
    return out.view(x.shape), stats


def residual_layer_norm_backward(grad, x, residual, weight, stats, dropout_p: float, seed: torch.Tensor
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``x``, ``residual``, ``weight`` and ``bias`` (each in its input's dtype)."""
    hidden = x.shape[-1]
    grad2, x2, residual2 = _rows(grad), _rows(x), _rows(residual)
    rows = x2.shape[0]
    dx = torch.empty((rows, hidden), dtype=x.dtype, device=x.device)
    dresidual = torch.empty((rows, hidden), dtype=residual.dtype, device=x.device)
    blocks = triton.cdiv(rows, ROWS_PER_BLOCK)
    partial_weight = torch.zeros((max(blocks, 1), hidden), dtype=torch.float32, device=x.device)
    partial_bias = torch.zeros((max(blocks, 1), hidden), dtype=torch.float32, device=x.device)
    if rows:
        block_n = triton.next_power_of_2(hidden)
        with device_scope(x):
            _backward_kernel[(blocks,)](grad2, x2, residual2, weight, stats, seed, dx, dresidual, partial_weight,
                                        partial_bias, rows, hidden, dropout_p, DROPOUT=dropout_p > 0.0,
                                        ROWS=ROWS_PER_BLOCK, BLOCK_N=block_n, num_warps=_warps(block_n))
    # the blocks' partial sums added in block order: the same bits at every call
    return (dx.view(x.shape), dresidual.view(x.shape), partial_weight.sum(0).to(weight.dtype),
            partial_bias.sum(0).to(weight.dtype))


def dropout_keep(shape: torch.Size, dropout_p: float, seed: torch.Tensor) -> torch.Tensor:
    """The kernels' dropout mask for inputs of ``shape`` (bool, True: kept), for tests."""
    hidden = shape[-1]
    rows = int(torch.Size(shape).numel() // max(hidden, 1))
    keep = torch.empty((rows, hidden), dtype=torch.int8, device=seed.device)
    if keep.numel():
        _keep_kernel[(rows,)](keep, seed, rows, hidden, dropout_p, BLOCK_N=triton.next_power_of_2(hidden))
    return keep.bool().view(shape)
