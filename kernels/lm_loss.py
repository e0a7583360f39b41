"""BLIP's LM loss as a fused linear + cross-entropy: Triton kernel, host functions and reference.

The image-grounded decoder is trained with next-token cross-entropy over the 30,524-word
vocabulary, label smoothing 0.1, padding ignored (BLIP section 3.2; ``BertLMHeadModel.forward`` in
the original ``models/med.py``). Written plainly, the step materialises the logits (N x V: 3,264 x
30,524 at batch 96 and 35 tokens), an fp32 copy of them for the loss, their fp32 gradient and its
half-precision cast: over a gigabyte written and read back for one number per row.

Here, as in Liger-Kernel's fused linear cross-entropy, the rows go in chunks. For each chunk one
GEMM in the input dtype makes the logits; one Triton program per row then reads its row twice:
once for the log-sum-exp and the smoothed loss, once to overwrite the logits *in place* with the
gradient of the loss with respect to them. Two more GEMMs turn that into the gradients of the
hidden states and of the weight, and a column sum into that of the bias. Only one chunk of logits
exists at a time, and never an fp32 copy. Because a scalar loss (``reduction='mean'``) knows its
gradients in the forward, its backward only scales them by the incoming gradient; per-token losses
(``'none'``: VQA weighs answers per sample) need the incoming gradient of every row, so their
backward recomputes the chunks' logits instead (:func:`linear_cross_entropy_backward`).

One row, logits ``x`` (V entries), target ``t``, smoothing ``e`` -- the target distribution of
``F.cross_entropy(label_smoothing=e)`` is ``(1 - e) onehot(t) + e / V``::

    lse        = log sum_j exp(x_j)
    loss       = lse - (1 - e) x_t - (e / V) sum_j x_j
    dloss/dx_j = softmax(x)_j - (1 - e) [j == t] - e / V

A row whose target is ``-100`` has loss 0 and gradient 0; ``'mean'`` divides by the number of the
others (NaN when there is none, as ``F.cross_entropy``). Targets are not range-checked (that would
synchronise with the host); an index outside [0, V) reads column 0 instead of stray memory.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from . import KERNEL_DTYPES

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the package and its CPU paths work without triton
    HAS_TRITON = False

IGNORE_INDEX = -100
# Logits per chunk: 2^25 is 1,099 rows of BLIP's vocabulary (64 MiB in bf16). Large enough that the
# three GEMMs per chunk run at full speed on an H100, small next to the whole batch's logits.
LOGITS_PER_CHUNK = 1 << 25
# Columns a program reads at a time; BLIP's vocabulary takes 8 blocks.
MAX_BLOCK_V = 4096


def check_inputs(hidden, weight, bias, targets, label_smoothing, allow_float64: bool = False) -> None:
    """Raise ValueError unless the inputs make a valid LM loss (shapes, dtypes, devices)."""
    where = "lm_loss"
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{where}: hidden (N, H) and weight (V, H) disagree: {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{where}: bias must be (V,) = ({weight.shape[0]},); got {tuple(bias.shape)}")
    if targets.shape != (hidden.shape[0],) or targets.dtype != torch.long:
        raise ValueError(f"{where}: targets must be int64 (N,) = ({hidden.shape[0]},); "
                         f"got {targets.dtype} {tuple(targets.shape)}")
    dtypes = KERNEL_DTYPES + ((torch.float64,) if allow_float64 else ())
    floats = [hidden, weight] + ([bias] if bias is not None else [])
    if any(t.dtype != hidden.dtype for t in floats) or hidden.dtype not in dtypes:
        raise ValueError(f"{where}: hidden, weight and bias must share one of "
                         f"{', '.join(str(d) for d in dtypes)}; got {[str(t.dtype) for t in floats]}")
    if any(t.device != hidden.device for t in floats + [targets]):
        raise ValueError(f"{where}: inputs must be on one device")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{where}: label_smoothing must be in [0, 1]; got {label_smoothing}")


def lm_loss_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    label_smoothing: float = 0.1,
    reduction: str = "mean",
) -> torch.Tensor:
    """Reference: vocabulary projection, then smoothed cross-entropy in ``promote_types(dtype, float32)``.

    ``hidden`` (N, H) are the decoder's transformed hidden states at the positions that predict
    ``targets`` (N,) (already shifted; ``-100`` = ignored), ``weight`` (V, H) the tied word
    embeddings, ``bias`` (V,). ``reduction='mean'`` averages over the non-ignored tokens like
    ``nn.CrossEntropyLoss``; ``'none'`` returns the per-token losses (0 where ignored).
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none'; got {reduction!r}")
    compute = torch.promote_types(hidden.dtype, torch.float32)
    logits = F.linear(hidden, weight, bias).to(compute)
    return F.cross_entropy(
        logits, targets, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing, reduction=reduction
    )


if HAS_TRITON:

    @triton.jit
    def _smoothed_cross_entropy_kernel(
        logits_ptr,
        targets_ptr,
        loss_ptr,
        scale_ptr,
        stride_row,
        stride_scale,
        V,
        smoothing,
        BLOCK_V: tl.constexpr,
        NUM_BLOCKS: tl.constexpr,
        WRITE_GRAD: tl.constexpr,
    ):
        """One program per row: its loss, and (WRITE_GRAD) its gradient times ``scale`` over its logits.

        NUM_BLOCKS is a constexpr rather than a loop over ``range(0, V, BLOCK_V)`` because the
        Triton 3.6 interpreter (used by the CPU tests) cannot take a runtime loop bound with
        NumPy >= 2.4; a model has one vocabulary, so this costs no extra compilation.
        """
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * stride_row
        target = tl.load(targets_ptr + row)
        ignored = target == -100  # IGNORE_INDEX
        cols = tl.arange(0, BLOCK_V)

        # Pass 1: log-sum-exp with an online max, and the plain sum for the smoothing term.
        row_max = tl.full((), float("-inf"), tl.float32)
        exp_sum = tl.full((), 0.0, tl.float32)
        x_sum = tl.full((), 0.0, tl.float32)
        for block in range(NUM_BLOCKS):
            offs = block * BLOCK_V + cols
            valid = offs < V
            x = tl.load(row_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(row_max, tl.max(x, axis=0))
            exp_sum = exp_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
            row_max = new_max
            x_sum += tl.sum(tl.where(valid, x, 0.0), axis=0)
        lse = row_max + tl.log(exp_sum)
        in_range = (target >= 0) & (target < V)
        x_target = tl.load(row_ptr + tl.where(in_range, target, 0)).to(tl.float32)
        loss = lse - (1.0 - smoothing) * x_target - smoothing / V * x_sum
        tl.store(loss_ptr + row, tl.where(ignored, 0.0, loss))

        # Pass 2: the gradient replaces the logits (its GEMMs read it from there).
        if WRITE_GRAD:
            scale = tl.where(ignored, 0.0, tl.load(scale_ptr + row * stride_scale))
            for block in range(NUM_BLOCKS):
                offs = block * BLOCK_V + cols
                valid = offs < V
                x = tl.load(row_ptr + offs, mask=valid, other=0.0).to(tl.float32)
                grad = tl.exp(x - lse) - smoothing / V - tl.where(offs == target, 1.0 - smoothing, 0.0)
                tl.store(row_ptr + offs, (grad * scale).to(logits_ptr.dtype.element_ty), mask=valid)


def _num_warps(block_v: int) -> int:
    # About 8 columns per thread in a block, eight warps at most.
    return max(1, min(8, block_v // 256))


def _rows_per_chunk(vocab: int, chunk_rows: int | None) -> int:
    return chunk_rows if chunk_rows is not None else max(1, LOGITS_PER_CHUNK // vocab)


def _smoothed_cross_entropy_(logits, targets, loss_rows, scale, label_smoothing, write_grad) -> None:
    """Launch the kernel on a chunk of logits (n, V), in place; ``scale`` 0-d or (n,) fp32."""
    rows, vocab = logits.shape
    block_v = min(triton.next_power_of_2(vocab), MAX_BLOCK_V)
    with torch.cuda.device(logits.device) if logits.is_cuda else contextlib.nullcontext():
        _smoothed_cross_entropy_kernel[(rows,)](
            logits,
            targets,
            loss_rows,
            scale,
            logits.stride(0),
            scale.stride(0) if scale.dim() else 0,
            vocab,
            float(label_smoothing),
            BLOCK_V=block_v,
            NUM_BLOCKS=triton.cdiv(vocab, block_v),
            WRITE_GRAD=write_grad,
            num_warps=_num_warps(block_v),
        )


def _chunked(hidden, weight, bias, targets, label_smoothing, scale, write_grad, chunk_rows, total_scale=None):
    """The chunk loop shared by forward and backward: per-row losses and, with ``write_grad``, the
    gradients of ``total_scale * sum(scale * loss_rows)`` with respect to hidden, weight and bias.

    ``scale`` multiplies the logits' gradient where the kernel writes it, in the inputs' dtype; ``total_scale``
    (0-d fp32) the gradients afterwards, in fp32. The mean's 1 / count goes there: folded into an fp16 logit
    gradient, (softmax - target) / count would fall below fp16's normal range at a few thousand rows."""
    if not HAS_TRITON:
        raise RuntimeError("lm_loss: triton is not installed")
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
    rows, vocab = hidden.shape[0], weight.shape[0]
    loss_rows = torch.empty(rows, dtype=torch.float32, device=hidden.device)
    grad_hidden = grad_weight = grad_bias = None
    if write_grad:
        grad_hidden = torch.empty_like(hidden)
        # fp32 sums across chunks; each chunk's GEMM already sums its rows in fp32
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_bias = None if bias is None else torch.zeros(vocab, dtype=torch.float32, device=bias.device)
    step = _rows_per_chunk(vocab, chunk_rows)
    for start in range(0, rows, step):
        end = min(start + step, rows)
        x = hidden[start:end]  # (n, H)
        logits = x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())  # (n, V)
        chunk_scale = scale if scale.dim() == 0 else scale[start:end]
        _smoothed_cross_entropy_(logits, targets[start:end], loss_rows[start:end], chunk_scale, label_smoothing,
                                 write_grad)
        if not write_grad:
            continue
        torch.mm(logits, weight, out=grad_hidden[start:end])  # (n, V) @ (V, H)
        if logits.dtype == torch.float32:
            grad_weight.addmm_(logits.t(), x)  # (V, n) @ (n, H)
        else:
            grad_weight += logits.t() @ x
        if grad_bias is not None:
            grad_bias += logits.sum(dim=0, dtype=torch.float32)
    if write_grad:
        if total_scale is not None:
            grad_hidden = grad_hidden.mul_(total_scale)
            grad_weight = grad_weight.mul_(total_scale)
            grad_bias = None if grad_bias is None else grad_bias.mul_(total_scale)
        grad_weight = grad_weight.to(weight.dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
    return loss_rows, grad_hidden, grad_weight, grad_bias


def linear_cross_entropy_mean(hidden, weight, bias, targets, label_smoothing=0.1, compute_grads=True,
                              chunk_rows=None):
    """The mean smoothed loss over non-ignored rows, and with ``compute_grads`` its gradients.

    Returns ``(loss, grad_hidden, grad_weight, grad_bias)``: ``loss`` a 0-d fp32 tensor, the
    gradients in the inputs' dtypes (``None`` without ``compute_grads``, and ``grad_bias`` without a
    bias). No host synchronisation: the count of non-ignored rows stays on the device.
    """
    check_inputs(hidden, weight, bias, targets, label_smoothing)
    count = (targets != IGNORE_INDEX).sum()
    scale = count.reciprocal().to(torch.float32)  # inf when every row is ignored: the loss is then NaN
    # every row's gradient is 0 then too (ignored rows write 0), and stays 0 rather than 0 * inf
    grad_scale = torch.where(count > 0, scale, 0.0)
    loss_rows, *grads = _chunked(hidden, weight, bias, targets, label_smoothing, torch.ones_like(scale),
                                 compute_grads, chunk_rows, total_scale=grad_scale)
    return (loss_rows.sum() * scale, *grads)


def linear_cross_entropy_rows(hidden, weight, bias, targets, label_smoothing=0.1, chunk_rows=None):
    """Per-row smoothed losses (N,) fp32, 0 where the target is ignored; no gradients."""
    check_inputs(hidden, weight, bias, targets, label_smoothing)
    no_scale = torch.zeros((), dtype=torch.float32, device=hidden.device)  # unread without gradients
    return _chunked(hidden, weight, bias, targets, label_smoothing, no_scale, False, chunk_rows)[0]


def linear_cross_entropy_backward(hidden, weight, bias, targets, label_smoothing, grad_rows, chunk_rows=None):
    """Gradients of ``sum(grad_rows * loss_rows)``: the backward of :func:`linear_cross_entropy_rows`.

    Returns ``(grad_hidden, grad_weight, grad_bias)`` (``grad_bias`` None without a bias).
    """
    check_inputs(hidden, weight, bias, targets, label_smoothing)
    if grad_rows.shape != targets.shape:
        raise ValueError(f"lm_loss backward: grad_rows must be (N,) = {tuple(targets.shape)}; "
                         f"got {tuple(grad_rows.shape)}")
    scale = grad_rows.to(torch.float32).contiguous()
    return _chunked(hidden, weight, bias, targets, label_smoothing, scale, True, chunk_rows)[1:]
