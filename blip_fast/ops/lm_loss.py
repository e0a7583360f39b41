"""The decoder's LM loss: vocabulary projection + smoothed next-token cross-entropy (BLIP section 3.2).

Backends (see :mod:`blip_fast.ops.registry`):

* ``reference`` -- ``lm_loss_ref``: ``F.linear`` then ``F.cross_entropy`` in fp32, every device.
* ``triton``    -- the fused linear + cross-entropy of :mod:`blip_fast.kernels.lm_loss`, CUDA tensors:
  chunks of logits, the gradient written over them by the kernel, never an fp32 copy.

The Triton path is three ``torch.library`` custom ops, so that ``torch.compile(fullgraph=True)``
holds them as opaque nodes (with fake implementations for their shapes):

* ``blip_fast::lm_loss_mean_triton`` returns the mean loss *and* its gradients, computed in the same
  pass; its registered backward multiplies them by the incoming gradient.
* ``blip_fast::lm_loss_rows_triton`` returns per-token losses; its backward calls
  ``blip_fast::lm_loss_rows_backward_triton``, which recomputes the logits chunk by chunk.

Under autocast the custom ops are not cast by torch (it only casts the ops it lists), so the
entry casts hidden states, weight and bias to the autocast dtype itself, as ``F.linear`` would be.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from blip_fast.kernels import KERNEL_DTYPES
from blip_fast.kernels.lm_loss import (
    HAS_TRITON,
    IGNORE_INDEX,
    check_inputs,
    linear_cross_entropy_backward,
    linear_cross_entropy_mean,
    linear_cross_entropy_rows,
    lm_loss_ref,
)

from ..shapes import BASE_WIDTH, FINETUNE_TEXT_LENGTH, PRETRAIN_BATCH, VOCAB_SIZE
from .registry import ParityCase, define_op


def _grad_or_empty(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    # custom ops cannot return None: "no gradient" is an empty tensor
    return grad if grad is not None else like.new_empty(0)


@torch.library.custom_op("blip_fast::lm_loss_mean_triton", mutates_args=())
def lm_loss_mean_triton_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    label_smoothing: float, compute_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    loss, grad_hidden, grad_weight, grad_bias = linear_cross_entropy_mean(
        hidden, weight, bias, targets, label_smoothing, compute_grads)
    return (loss, _grad_or_empty(grad_hidden, hidden), _grad_or_empty(grad_weight, weight),
            _grad_or_empty(grad_bias, weight))


@lm_loss_mean_triton_op.register_fake
def _lm_loss_mean_fake(hidden, weight, bias, targets, label_smoothing, compute_grads):
    check_inputs(hidden, weight, bias, targets, label_smoothing)
    loss = hidden.new_empty((), dtype=torch.float32)
    if not compute_grads:
        return loss, hidden.new_empty(0), weight.new_empty(0), weight.new_empty(0)
    # the kernels make their inputs contiguous, so the gradients are contiguous whatever the inputs' strides
    grad_bias = weight.new_empty(0) if bias is None else bias.new_empty(bias.shape)
    return loss, hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), grad_bias


def _setup_mean(ctx, inputs, output):
    _, grad_hidden, grad_weight, grad_bias = output
    ctx.computed_grads, ctx.has_bias = inputs[5], inputs[2] is not None
    ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)


def _backward_mean(ctx, grad_loss, *_grads_of_grads):
    if not ctx.computed_grads:
        raise RuntimeError("lm_loss_mean_triton was called with compute_grads=False; it has no gradients")
    grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
    return (grad_hidden * grad_loss, grad_weight * grad_loss, grad_bias * grad_loss if ctx.has_bias else None,
            None, None, None)


lm_loss_mean_triton_op.register_autograd(_backward_mean, setup_context=_setup_mean)


@torch.library.custom_op("blip_fast::lm_loss_rows_triton", mutates_args=())
def lm_loss_rows_triton_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    label_smoothing: float,
) -> torch.Tensor:
    return linear_cross_entropy_rows(hidden, weight, bias, targets, label_smoothing)


@lm_loss_rows_triton_op.register_fake
def _lm_loss_rows_fake(hidden, weight, bias, targets, label_smoothing):
    check_inputs(hidden, weight, bias, targets, label_smoothing)
    return hidden.new_empty(hidden.shape[0], dtype=torch.float32)


@torch.library.custom_op("blip_fast::lm_loss_rows_backward_triton", mutates_args=())
def lm_loss_rows_backward_triton_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    label_smoothing: float, grad_rows: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_hidden, grad_weight, grad_bias = linear_cross_entropy_backward(
        hidden, weight, bias, targets, label_smoothing, grad_rows)
    return grad_hidden, grad_weight, _grad_or_empty(grad_bias, weight)


@lm_loss_rows_backward_triton_op.register_fake
def _lm_loss_rows_backward_fake(hidden, weight, bias, targets, label_smoothing, grad_rows):
    check_inputs(hidden, weight, bias, targets, label_smoothing)
    grad_bias = weight.new_empty(0) if bias is None else bias.new_empty(bias.shape)
    return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), grad_bias


def _setup_rows(ctx, inputs, output):
    hidden, weight, bias, targets, label_smoothing = inputs
    ctx.label_smoothing, ctx.has_bias = label_smoothing, bias is not None
    ctx.save_for_backward(hidden, weight, bias, targets)


def _backward_rows(ctx, grad_rows):
    hidden, weight, bias, targets = ctx.saved_tensors
    grad_hidden, grad_weight, grad_bias = lm_loss_rows_backward_triton_op(
        hidden, weight, bias, targets, ctx.label_smoothing, grad_rows)
    return grad_hidden, grad_weight, grad_bias if ctx.has_bias else None, None, None


lm_loss_rows_triton_op.register_autograd(_backward_rows, setup_context=_setup_rows)


def lm_loss_triton(hidden, weight, bias, targets, label_smoothing=0.1, reduction="mean"):
    """The Triton backend: same contract as :func:`~blip_fast.kernels.lm_loss.lm_loss_ref`."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if reduction == "mean":
        # the gradients are made in the forward pass, so make them only when a backward can follow
        wants_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (hidden, weight, bias))
        return lm_loss_mean_triton_op(hidden, weight, bias, targets, label_smoothing, wants_grad)[0]
    if reduction == "none":
        return lm_loss_rows_triton_op(hidden, weight, bias, targets, label_smoothing)
    raise ValueError(f"reduction must be 'mean' or 'none'; got {reduction!r}")


lm_loss_op = define_op("lm_loss", lm_loss_ref)
lm_loss_op.register_triton(lm_loss_triton, HAS_TRITON, dtypes=KERNEL_DTYPES)


def lm_loss(hidden, weight, bias, targets, label_smoothing=0.1, reduction="mean"):
    """LM loss through the selected backend; see :func:`~blip_fast.kernels.lm_loss.lm_loss_ref`."""
    return lm_loss_op(hidden, weight, bias, targets, label_smoothing, reduction)


def _lm_case(tokens: int, hidden: int, vocab: int, pad_fraction: float, reduction: str):
    def make(device, dtype, generator):
        h = torch.randn(tokens, hidden, generator=generator).to(device, dtype)
        w = (torch.randn(vocab, hidden, generator=generator) * 0.02).to(device, dtype)
        b = (torch.randn(vocab, generator=generator) * 0.02).to(device, dtype)
        t = torch.randint(0, vocab, (tokens,), generator=generator)
        t[torch.rand(tokens, generator=generator) < pad_fraction] = IGNORE_INDEX
        t[0] = 0  # at least one real target: the mean of none is NaN
        return (h, w, b, t.to(device), 0.1, reduction), {}

    return make


# BLIP's pretraining batch (96 captions of up to 35 tokens, each predicting all but its first, ~45% padding), an
# odd size, and the per-token losses of VQA's answer decoder
for _mode, _n, _pad, _reduction in [("pretrain", PRETRAIN_BATCH * (FINETUNE_TEXT_LENGTH - 1), 0.45, "mean"),
                                    ("odd", 97, 0.3, "mean"), ("per_token", 97, 0.3, "none")]:
    lm_loss_op.parity_cases.append(
        ParityCase(mode=_mode, shape=f"N{_n} H{BASE_WIDTH} V{VOCAB_SIZE}",
                   make_inputs=_lm_case(_n, BASE_WIDTH, VOCAB_SIZE, _pad, _reduction), grad_argnums=(0, 1, 2))
    )


def _projection_flops(hidden_shape, weight_shape, gemms: int) -> int:
    """FLOPs of ``gemms`` (N, H) x (H, V)-sized GEMMs: the logits, and in a backward two more."""
    return gemms * 2 * hidden_shape[0] * hidden_shape[1] * weight_shape[0]


# torch.utils.flop_counter cannot see the GEMMs inside an opaque op: tell it what they cost, so that
# `python benchmarks/bench_step.py` counts the fused loss's FLOPs (its hardware MFU) like the reference's.
@register_flop_formula(torch.ops.blip_fast.lm_loss_mean_triton)
def _mean_flops(hidden_shape, weight_shape, bias_shape, targets_shape, label_smoothing, compute_grads,
                out_shape=None, **kwargs) -> int:
    return _projection_flops(hidden_shape, weight_shape, 3 if compute_grads else 1)


@register_flop_formula(torch.ops.blip_fast.lm_loss_rows_triton)
def _rows_flops(hidden_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return _projection_flops(hidden_shape, weight_shape, 1)


@register_flop_formula(torch.ops.blip_fast.lm_loss_rows_backward_triton)
def _rows_backward_flops(hidden_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return _projection_flops(hidden_shape, weight_shape, 3)  # the logits again, then both gradients
