"""FP8 matmuls for the ViT's linear layers (``train.fp8_vit``).

The ViT's four linear layers per block (attention qkv and projection, the MLP's two) carry most of the step's FLOPs
at ViT-B/224 (docs/benchmarks.md's profile: ~58%). :class:`Fp8Linear` runs them with ``torch._scaled_mm`` on
8-bit floats, as Transformer Engine's and torchao's float8 training do with per-tensor dynamic scales: the forward
quantises the input and the weight to e4m3 (more mantissa), the backward the output's gradient to e5m2 (more
range), each with one scale per tensor from its absolute maximum, so that its largest value lands on the format's
largest. Products accumulate in fp32 inside the matmul; outputs come back in the activations' dtype (bf16 under
autocast), the weight's gradient in fp32. The quantised input and weight are what backward keeps (one byte an
element instead of two or four).

Rows are padded with zeros to a multiple of 16 (the FP8 matmuls' granularity); a layer whose widths are not
multiples of 16 runs as an ordinary linear layer. The parameters are the layer's own (the same ``Parameter``
objects, the same state-dict names): checkpoints, the optimizer and the momentum update see no difference.

Whether training stays where bf16 takes it is a measured question, not a given: ``benchmarks/bench_fp8.py`` trains
ViT-B/16 from the same start with and without FP8 and compares the loss curves (and the step times).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
GRANULE = 16  # rows and widths of an FP8 matmul come in multiples of this


def quantize(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(``t`` in ``dtype``, its fp32 scale): ``t ~ quantised * scale``, the largest magnitude on ``dtype``'s largest."""
    amax = t.detach().abs().amax().float().clamp(min=1e-12)
    scale = amax / torch.finfo(dtype).max
    return (t.float() / scale).to(dtype), scale


def dequantize(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return t.float() * scale


class _Fp8Matmul(torch.autograd.Function):
    """``x @ weight.T`` for ``x`` (M, K) with M, K, N multiples of 16: e4m3 forward, e5m2 output gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        x8, x_scale = quantize(x, E4M3)
        w8, w_scale = quantize(weight, E4M3)
        ctx.save_for_backward(x8, x_scale, w8, w_scale)
        ctx.dtypes = (x.dtype, weight.dtype)
        # _scaled_mm's second operand is column-major: the row-major (N, K) weight's transpose is
        return torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=out_dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x8, x_scale, w8, w_scale = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        g8, g_scale = quantize(grad, E5M2)
        # dx = g @ W: (M, N) x (N, K), W laid out column-major; dW = g.T @ x: (N, M) x (M, K)
        dx = torch._scaled_mm(g8, w8.t().contiguous().t(), scale_a=g_scale, scale_b=w_scale, out_dtype=x_dtype)
        dw = torch._scaled_mm(g8.t().contiguous(), x8.t().contiguous().t(), scale_a=g_scale, scale_b=x_scale,
                              out_dtype=torch.float32)
        return dx, dw.to(w_dtype), None


class Fp8Linear(nn.Linear):
    """An ``nn.Linear`` whose matmul runs in FP8 (module docstring); built from a layer with :meth:`from_linear`."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight, layer.bias = linear.weight, linear.bias  # the same Parameters
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_features % GRANULE or self.out_features % GRANULE:
            return F.linear(x, self.weight, self.bias)
        device = x.device.type
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        rows = x.reshape(-1, self.in_features)
        padding = -rows.shape[0] % GRANULE
        with torch.autocast(device, enabled=False):
            out = _Fp8Matmul.apply(F.pad(rows, (0, 0, 0, padding)) if padding else rows, self.weight, out_dtype)
            if padding:
                out = out[:rows.shape[0]]
            if self.bias is not None:
                out = out + self.bias.to(out_dtype)
        return out.view(*x.shape[:-1], self.out_features)


def fp8_unsupported(device: torch.device) -> str | None:
    """Why FP8 matmuls cannot train on ``device`` (a GPU before compute capability 8.9, a CPU), or None."""
    if device.type != "cuda":
        return f"a CUDA GPU with FP8 matmuls (compute capability 8.9 or later; this run trains on {device})"
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        return f"a GPU with FP8 matmuls (compute capability 8.9 or later; this one has {capability[0]}.{capability[1]})"
    return None


def use_fp8_linears(module: nn.Module) -> int:
    """Every ``nn.Linear`` inside ``module``'s transformer blocks (``blocks``) replaced by an :class:`Fp8Linear` over
    the same parameters; the patch embedding and anything outside the blocks stay as they are. Returns how many."""
    swapped = 0
    for block in getattr(module, "blocks", []):
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, Fp8Linear.from_linear(child))
                    swapped += 1
    return swapped
