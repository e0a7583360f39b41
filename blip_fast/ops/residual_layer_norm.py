"""BERT's sublayer output, ``LayerNorm(dropout(x) + residual)``, as one op. Backends (see
:mod:`blip_fast.ops.registry`):

* ``reference`` -- :func:`~blip_fast.kernels.residual_layer_norm.residual_layer_norm_ref`: dropout, add, LayerNorm,
  the eager chain BLIP's text transformer always ran (and the one ``torch.compile`` fuses inside a compiled block);
* ``triton``    -- the one-pass kernels of :mod:`blip_fast.kernels.residual_layer_norm`, CUDA tensors, as two
  ``torch.library`` custom ops (forward, backward). Registered with ``auto=False`` until a GPU run times it on the
  eager paths it is for (``BLIP_FAST_IMPL=auto,residual_layer_norm=triton``).
"""

from __future__ import annotations

import torch

from blip_fast.kernels import KERNEL_DTYPES
from blip_fast.kernels.residual_layer_norm import (
    HAS_TRITON,
    residual_layer_norm_backward,
    residual_layer_norm_forward,
    residual_layer_norm_ref,
)

from ..shapes import BASE_WIDTH, FINETUNE_TEXT_LENGTH, PRETRAIN_BATCH
from .registry import ParityCase, define_op


@torch.library.custom_op("blip_fast::residual_layer_norm_triton", mutates_args=())
def residual_layer_norm_triton_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                  eps: float, dropout_p: float, seed: torch.Tensor, out_dtype: torch.dtype
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    return residual_layer_norm_forward(x, residual, weight, bias, eps, dropout_p, seed, out_dtype)


@residual_layer_norm_triton_op.register_fake
def _forward_fake(x, residual, weight, bias, eps, dropout_p, seed, out_dtype):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty((rows, 2), dtype=torch.float32)


@torch.library.custom_op("blip_fast::residual_layer_norm_backward_triton", mutates_args=())
def residual_layer_norm_backward_triton_op(grad: torch.Tensor, x: torch.Tensor, residual: torch.Tensor,
                                           weight: torch.Tensor, stats: torch.Tensor, dropout_p: float,
                                           seed: torch.Tensor
                                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return residual_layer_norm_backward(grad, x, residual, weight, stats, dropout_p, seed)


@residual_layer_norm_backward_triton_op.register_fake
def _backward_fake(grad, x, residual, weight, stats, dropout_p, seed):
    return torch.empty_like(x), torch.empty_like(residual), torch.empty_like(weight), torch.empty_like(weight)


def _setup(ctx, inputs, output):
    x, residual, weight, _bias, _eps, dropout_p, seed, _out_dtype = inputs
    ctx.dropout_p = dropout_p
    ctx.save_for_backward(x, residual, weight, output[1], seed)


def _backward(ctx, grad_out, _grad_stats):
    x, residual, weight, stats, seed = ctx.saved_tensors
    dx, dresidual, dweight, dbias = residual_layer_norm_backward_triton_op(grad_out.contiguous(), x, residual, weight,
                                                                          stats, ctx.dropout_p, seed)
    return dx, dresidual, dweight, dbias, None, None, None, None


residual_layer_norm_triton_op.register_autograd(_backward, setup_context=_setup)


def residual_layer_norm_triton(x, residual, weight, bias, eps: float, dropout_p: float = 0.0):
    """The Triton backend: the eager chain's result and dtype (fp32 under autocast, where LayerNorm runs in fp32)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        out_dtype = torch.float32
    else:
        out_dtype = torch.promote_types(torch.promote_types(x.dtype, residual.dtype), weight.dtype)
    # the seed stays on the device: no synchronisation, and a CUDA graph draws a new one at each replay
    seed = (torch.randint(0, 2**31 - 1, (1,), device=x.device) if dropout_p > 0.0
            else torch.zeros(1, dtype=torch.int64, device=x.device))
    return residual_layer_norm_triton_op(x, residual, weight, bias, eps, dropout_p, seed, out_dtype)[0]


residual_layer_norm_op = define_op("residual_layer_norm", residual_layer_norm_ref)
residual_layer_norm_op.register_triton(residual_layer_norm_triton, HAS_TRITON, dtypes=KERNEL_DTYPES, auto=False)


def residual_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        eps: float, dropout_p: float = 0.0) -> torch.Tensor:
    """``layer_norm(dropout(x, dropout_p) + residual, weight, bias, eps)`` through the selected backend."""
    return residual_layer_norm_op(x, residual, weight, bias, eps, dropout_p)


def _case(rows: int, length: int, hidden: int):
    def make(device, dtype, generator):
        def t(*shape, scale=1.0):
            return (torch.randn(*shape, generator=generator) * scale).to(device, dtype)

        return (t(rows, length, hidden), t(rows, length, hidden, scale=4.0), 1.0 + t(hidden, scale=0.1),
                t(hidden, scale=0.1), 1e-12), {}

    return make


# BERT-base's sublayer outputs: a fine-tuning batch of 35-token texts, and pretraining's 96 captions (the 1e-12 eps of
# BERT's LayerNorm); dropout off (its numbers differ between backends by design: the tests compare the kernels' mask)
for _mode, _rows, _length in [("text_rows", 32, FINETUNE_TEXT_LENGTH), ("pretrain_captions", PRETRAIN_BATCH, 30)]:
    residual_layer_norm_op.parity_cases.append(ParityCase(
        mode=_mode, shape=f"B{_rows} L{_length} H{BASE_WIDTH}", make_inputs=_case(_rows, _length, BASE_WIDTH),
        grad_argnums=(0, 1, 2, 3)))
