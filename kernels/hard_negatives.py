"""Hard-negative sampling for the ITM loss: Triton kernel, host launcher and reference.

BLIP (Li et al. 2022, section 3.2, following ALBEF) trains image-text matching on hard negatives:
for every image of the batch one negative text is drawn, and for every text one negative image,
with probability growing with their ITC similarity. The original code
(``models/blip_pretrain.py``) did, for the [B, B] in-batch similarity ``sim``::

    weights = F.softmax(sim, dim=1) + 1e-4
    weights.fill_diagonal_(0)                      # row i's positive is column i
    for b in range(bs):
        neg_idx = torch.multinomial(weights[b], 1).item()   # one host sync per row

Here the randomness is an input, one uniform ``u_i`` in [0, 1) per row, and the draw is inverse-CDF
sampling, which has the same distribution and no host synchronisation::

    w[i, :] = softmax(sim[i, :]) + 1e-4,  w[i, i] = 0        (fp32)
    cdf     = inclusive cumsum of w[i, :]
    pick    = first j with cdf[j] > u_i * cdf[-1]

Because the diagonal weight is zero, ``cdf[i] == cdf[i-1]`` in a sequential sum and ``i`` can never be
the first index to pass the target. A parallel scan (the Triton and CUDA kernels, torch's cumsum on
CUDA) may round ``cdf[i]`` above ``cdf[i-1]``, so those skip column ``i`` outright (the reference by
giving ``cdf[i]`` the value of ``cdf[i-1]``). If rounding leaves no index past it (``u_i * cdf[-1]`` rounded up to
``cdf[-1]``), the pick is the last column with nonzero weight: ``N - 1``, or ``N - 2`` for the row
whose diagonal is column ``N - 1``. A row holding NaN or +inf makes every weight NaN, and every
backend then returns that same fallback column, where the original's ``torch.multinomial`` raises:
checking would cost a host synchronisation per step, and a training step with such similarities has
non-finite losses already.

Implementations sum the cdf in different orders, so a uniform within ~1e-7 (relative) of a cdf
boundary may pick the neighbouring index; :func:`near_cdf_boundary` flags such uniforms for tests.
"""

from __future__ import annotations

import contextlib

import torch

from . import KERNEL_DTYPES

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the package and its CPU paths work without triton
    HAS_TRITON = False

# Softmax weights get this floor so that every non-diagonal candidate keeps some probability.
WEIGHT_FLOOR = 1e-4
# Rows longer than this are processed in several column blocks; BLIP's in-batch rows (N = B, a few
# hundred) fit in one.
MAX_BLOCK_N = 4096


def check_inputs(sim: torch.Tensor, uniforms: torch.Tensor, allow_float64: bool = False) -> None:
    """Raise ValueError unless ``sim`` [B, N] and ``uniforms`` [B] are valid for sampling.

    Kernels take float32/float16/bfloat16 logits and float32 uniforms; ``allow_float64`` admits
    float64 for both, which only the reference computes (parity checks run it in fp64). The values
    of ``uniforms`` are not checked: that would cost a host synchronisation.
    """
    where = "sample_hard_negatives"
    if not isinstance(sim, torch.Tensor) or not isinstance(uniforms, torch.Tensor):
        raise ValueError(f"{where}: sim and uniforms must be tensors")
    if sim.dim() != 2:
        raise ValueError(f"{where}: sim must be 2-D [B, N], got shape {tuple(sim.shape)}")
    wide = allow_float64 and sim.dtype == torch.float64
    if sim.dtype not in KERNEL_DTYPES and not wide:
        raise ValueError(f"{where}: sim must be float32, float16 or bfloat16, got {sim.dtype}")
    rows, cols = sim.shape
    if cols < 2:
        raise ValueError(f"{where} needs at least 2 candidates per row (N >= 2), got N={cols}")
    if rows < 1:
        raise ValueError(f"{where} needs at least one row (B >= 1), got B=0")
    if cols < rows:
        raise ValueError(
            f"{where}: sim must have N >= B (row i's positive is column i), got B={rows}, N={cols}"
        )
    if uniforms.dim() != 1 or uniforms.shape[0] != rows:
        raise ValueError(
            f"{where}: uniforms must be 1-D of length B={rows}, got shape {tuple(uniforms.shape)}"
        )
    if uniforms.dtype != torch.float32 and not (allow_float64 and uniforms.dtype == torch.float64):
        raise ValueError(f"{where}: uniforms must be float32, got {uniforms.dtype}")
    if uniforms.device != sim.device:
        raise ValueError(
            f"{where}: sim and uniforms must be on the same device, got {sim.device} and {uniforms.device}"
        )


def sample_hard_negatives_ref(sim: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Reference: one negative column per row of ``sim`` [B, N], by inverse-CDF sampling.

    Computes in ``promote_types(sim.dtype, float32)``: fp32 for the kernels' dtypes, fp64 for fp64.
    """
    check_inputs(sim, uniforms, allow_float64=True)
    rows, cols = sim.shape
    compute = torch.promote_types(sim.dtype, torch.float32)
    weights = torch.softmax(sim.to(compute), dim=1) + WEIGHT_FLOOR  # [B, N]
    weights.fill_diagonal_(0)
    cdf = weights.cumsum(dim=1)  # [B, N], non-decreasing
    # on CUDA the cumsum is a parallel scan, which may round the diagonal's cdf above its neighbour's
    diagonal = torch.arange(1, min(rows, cols), device=sim.device)
    cdf[diagonal, diagonal] = cdf[diagonal, diagonal - 1]
    target = uniforms.to(compute) * cdf[:, -1]  # [B]
    pick = torch.searchsorted(cdf, target.unsqueeze(1), right=True).squeeze(1)  # [B], first cdf > target
    # A plain clamp to N - 1 would return the diagonal for row N - 1; fall back to the last column
    # with nonzero weight instead.
    index = torch.arange(rows, device=sim.device)
    last = torch.where(index == cols - 1, cols - 2, cols - 1)
    return torch.where(pick < cols, pick, last)


def near_cdf_boundary(sim: torch.Tensor, uniforms: torch.Tensor, rtol: float = 1e-5) -> torch.Tensor:
    """BoolTensor [B]: rows whose uniform lies within ``rtol`` of a normalised cdf boundary.

    There two correct implementations may pick neighbouring indices, since they round the cdf
    differently. Computed in fp64 for tests and parity inputs, not for the hot path.
    """
    weights = torch.softmax(sim.double(), dim=1) + WEIGHT_FLOOR
    weights.fill_diagonal_(0)
    cdf = weights.cumsum(dim=1)
    cdf = cdf / cdf[:, -1:]  # [B, N], boundaries in units of the uniform
    return ((cdf - uniforms.double().unsqueeze(1)).abs() <= rtol).any(dim=1)


if HAS_TRITON:

    @triton.jit
    def _row_weights(sim_row, stride_col, offs, row, N, row_max, row_sum):
        """Weights of one column block: softmax + floor, zero on the diagonal and past N."""
        valid = offs < N
        x = tl.load(sim_row + offs * stride_col, mask=valid, other=float("-inf")).to(tl.float32)
        w = tl.exp(x - row_max) / row_sum + 1e-4  # WEIGHT_FLOOR
        return tl.where(valid & (offs != row), w, 0.0)

    @triton.jit
    def _hard_negatives_kernel(
        sim_ptr,
        uniforms_ptr,
        out_ptr,
        N,
        stride_row,
        stride_col,
        BLOCK_N: tl.constexpr,
        NUM_BLOCKS: tl.constexpr,
    ):
        """One program per row; three passes over the row's NUM_BLOCKS column blocks.

        NUM_BLOCKS is a constexpr rather than a loop over ``range(0, N, BLOCK_N)`` because the
        Triton 3.6 interpreter (used by the CPU tests) cannot take a runtime loop bound with
        NumPy >= 2.4. It adds a compilation per block count, which only rows past MAX_BLOCK_N have.
        """
        row = tl.program_id(0).to(tl.int64)
        sim_row = sim_ptr + row * stride_row
        cols = tl.arange(0, BLOCK_N)

        # Pass 1: softmax statistics, with an online max so that they take a single read of the row.
        row_max = tl.full((), float("-inf"), tl.float32)
        row_sum = tl.full((), 0.0, tl.float32)
        for block in range(NUM_BLOCKS):
            offs = block * BLOCK_N + cols
            x = tl.load(sim_row + offs * stride_col, mask=offs < N, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(row_max, tl.max(x, axis=0))
            # while every column so far is -inf, subtract 0 instead (exp(-inf - -inf) would be NaN)
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            row_sum = row_sum * tl.exp(row_max - safe_max) + tl.sum(tl.exp(x - safe_max), axis=0)
            row_max = new_max

        # Pass 2: the total weight. It is accumulated block by block exactly as the carry of pass 3,
        # so the target is u * (the cdf's own last value).
        total = tl.full((), 0.0, tl.float32)
        for block in range(NUM_BLOCKS):
            w = _row_weights(sim_row, stride_col, block * BLOCK_N + cols, row, N, row_max, row_sum)
            total += tl.sum(w, axis=0)
        target = tl.load(uniforms_ptr + row) * total

        # Pass 3: cdf = carry + in-block inclusive scan; keep the first index past the target.
        carry = tl.full((), 0.0, tl.float32)
        pick = tl.full((), N, tl.int32)
        for block in range(NUM_BLOCKS):
            offs = block * BLOCK_N + cols
            w = _row_weights(sim_row, stride_col, offs, row, N, row_max, row_sum)
            cdf = carry + tl.cumsum(w, axis=0)
            # the diagonal's weight is 0, but a parallel scan can round its cdf above its neighbour's
            hit = (cdf > target) & (offs < N) & (offs != row)
            pick = tl.minimum(pick, tl.min(tl.where(hit, offs, N), axis=0))
            carry += tl.sum(w, axis=0)

        fallback = tl.where(row == N - 1, N - 2, N - 1)
        pick = tl.where(pick < N, pick, fallback)
        tl.store(out_ptr + row, pick.to(tl.int64))


def _num_warps(block_n: int) -> int:
    # About 8 columns per thread: one warp for BLIP's in-batch rows (N <= 256), eight at most.
    return max(1, min(8, block_n // 256))


def sample_hard_negatives_triton(sim: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Triton launcher: same contract as :func:`sample_hard_negatives_ref`, one program per row."""
    if not HAS_TRITON:
        raise RuntimeError("sample_hard_negatives_triton: triton is not installed")
    check_inputs(sim, uniforms)
    rows, cols = sim.shape
    uniforms = uniforms.contiguous()
    out = torch.empty(rows, dtype=torch.int64, device=sim.device)
    block_n = min(triton.next_power_of_2(cols), MAX_BLOCK_N)
    grid = (rows,)
    # Triton launches on the current device; make it sim's (CPU tensors only occur in the interpreter).
    with torch.cuda.device(sim.device) if sim.is_cuda else contextlib.nullcontext():
        _hard_negatives_kernel[grid](
            sim,
            uniforms,
            out,
            cols,
            sim.stride(0),
            sim.stride(1),
            BLOCK_N=block_n,
            NUM_BLOCKS=triton.cdiv(cols, block_n),
            num_warps=_num_warps(block_n),
        )
    return out
