"""The one-pass ``LayerNorm(dropout(x) + residual)`` kernels (Triton) against the reference, forward and gradients.

Shapes: one row of 16, 3-D inputs, widths that are not powers of two (24, 33, 40) and BERT's 768, rows that do and do
not fill the backward's 4-row blocks; dropout 0, 0.1 and 0.25 with the kernels' own mask; inputs of mixed dtypes as
autocast leaves them (fp16 ``x``, fp32 residual and weights).

Tolerances, against the reference evaluated in fp64 on the same inputs and mask: fp32 within 1e-5 relative (the
output and each of the four gradients); fp16 by flash-attention's rule (the kernel's error at most twice that of the
reference evaluated in fp16, plus ``2e-3 * max |ref|``); bf16 the same rule on the GPU only.
"""

import pytest
import torch
from backend_helpers import let_backend_run_on
from tensor_checks import assert_close_to_truth as assert_close

from blip_fast import ops
from blip_fast.config import tiny_config
from blip_fast.kernels import residual_layer_norm as kernel
from blip_fast.models.med import TextTransformer
from blip_fast.ops.residual_layer_norm import (
    residual_layer_norm_backward_triton_op,
    residual_layer_norm_op,
    residual_layer_norm_triton,
    residual_layer_norm_triton_op,
)

SHAPES = [(1, 16), (3, 5, 24), (7, 40), (9, 33), (2, 3, 768)]
EPS = 1e-5


def make_inputs(shape, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def t(*size, scale=1.0, shift=0.0):
        return torch.randn(*size, generator=generator, dtype=torch.float64) * scale + shift

    hidden = shape[-1]
    return t(*shape), t(*shape, scale=3.0), t(hidden, scale=0.2, shift=1.0), t(hidden, scale=0.2), t(*shape)


def reference(x, residual, weight, bias, cotangent, dropout_p, keep):
    leaves = [x.clone().requires_grad_(), residual.clone().requires_grad_(), weight.clone().requires_grad_(),
              bias.clone().requires_grad_()]
    out = kernel.residual_layer_norm_ref(*leaves, EPS, dropout_p, keep)
    return out.detach(), torch.autograd.grad(out, leaves, cotangent)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1, 0.25])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_reference(triton_device, dtype, dropout_p, shape):
    x, residual, weight, bias, cotangent = make_inputs(shape)
    seed = torch.tensor([7 + len(shape)], device=triton_device)
    keep = kernel.dropout_keep(x.shape, dropout_p, seed).cpu() if dropout_p else None
    truth = reference(x, residual, weight, bias, cotangent, dropout_p, keep)
    low = [t.to(triton_device, dtype) for t in (x, residual, weight, bias, cotangent)]
    low_truth = reference(*low, dropout_p, None if keep is None else keep.to(triton_device))
    out, stats = kernel.residual_layer_norm_forward(*low[:4], EPS, dropout_p, seed, dtype)
    grads = kernel.residual_layer_norm_backward(low[4], low[0], low[1], low[2], stats, dropout_p, seed)
    assert out.dtype == dtype and [g.dtype for g in grads] == [dtype] * 4
    assert_close(out, truth[0], low_truth[0], dtype, "output")
    for name, got, want, want_low in zip(("x", "residual", "weight", "bias"), grads, truth[1], low_truth[1],
                                         strict=True):
        assert_close(got, want, want_low, dtype, f"d{name}")


def test_triton_dropout_keeps_its_share_and_draws_per_seed(triton_device):
    shape = (64, 96)
    keeps = [kernel.dropout_keep(shape, 0.25, torch.tensor([seed], device=triton_device)) for seed in (1, 1, 2)]
    assert torch.equal(keeps[0], keeps[1]) and not torch.equal(keeps[0], keeps[2])
    assert abs(keeps[0].float().mean().item() - 0.75) < 0.02  # 6,144 draws: 4 standard deviations is 0.022


def test_triton_mixed_dtypes_as_autocast_leaves_them(triton_device):
    """An fp16 projection output on an fp32 residual stream with fp32 LayerNorm weights: fp32 out, each gradient in
    its input's dtype, as the eager chain gives them."""
    x, residual, weight, bias, cotangent = make_inputs((6, 40), seed=3)
    truth = reference(x.half().double(), residual, weight, bias, cotangent, 0.0, None)
    inputs = [x.half(), residual.float(), weight.float(), bias.float()]
    inputs = [t.to(triton_device) for t in inputs]
    out, stats = kernel.residual_layer_norm_forward(*inputs, EPS, 0.0, torch.zeros(1, dtype=torch.int64,
                                                                                    device=triton_device),
                                                    torch.float32)
    grads = kernel.residual_layer_norm_backward(cotangent.float().to(triton_device), *inputs[:3], stats, 0.0,
                                                torch.zeros(1, dtype=torch.int64, device=triton_device))
    assert out.dtype == torch.float32 and [g.dtype for g in grads] == [torch.float16] + [torch.float32] * 3
    assert_close(out, truth[0], what="output")
    for got, want in zip(grads[1:], truth[1][1:], strict=True):
        assert_close(got, want)
    # fp16's own rounding of dx: within a unit in its last place
    torch.testing.assert_close(grads[0].double().cpu(), truth[1][0], rtol=1e-3, atol=1e-3)


def test_triton_gradients_repeat_bitwise(triton_device):
    x, residual, weight, bias, cotangent = (t.float().to(triton_device) for t in make_inputs((13, 40), seed=4))
    seed = torch.tensor([5], device=triton_device)
    _, stats = kernel.residual_layer_norm_forward(x, residual, weight, bias, EPS, 0.1, seed, torch.float32)
    first = kernel.residual_layer_norm_backward(cotangent, x, residual, weight, stats, 0.1, seed)
    second = kernel.residual_layer_norm_backward(cotangent, x, residual, weight, stats, 0.1, seed)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_triton_refuses_what_it_cannot_take(triton_device):
    x, residual, weight, bias, _ = (t.float().to(triton_device) for t in make_inputs((3, 24)))
    seed = torch.zeros(1, dtype=torch.int64, device=triton_device)
    with pytest.raises(ValueError, match="must match"):
        kernel.residual_layer_norm_forward(x, residual[:2], weight, bias, EPS, 0.0, seed, torch.float32)
    with pytest.raises(ValueError, match=r"must be \(24,\)"):
        kernel.residual_layer_norm_forward(x, residual, weight[:5], bias, EPS, 0.0, seed, torch.float32)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        kernel.residual_layer_norm_forward(x, residual, weight, bias, EPS, 1.0, seed, torch.float32)
    with pytest.raises(ValueError, match="float64"):
        kernel.residual_layer_norm_forward(x.double(), residual, weight, bias, EPS, 0.0, seed, torch.float32)


def test_triton_ops_pass_opcheck(triton_device):
    x, residual, weight, bias, cotangent = (t.float().to(triton_device) for t in make_inputs((5, 3, 24), seed=6))
    seed = torch.tensor([3], device=triton_device)
    leaves = [t.clone().requires_grad_() for t in (x, residual, weight, bias)]
    torch.library.opcheck(residual_layer_norm_triton_op, (*leaves, EPS, 0.1, seed, torch.float32))
    _, stats = kernel.residual_layer_norm_forward(x, residual, weight, bias, EPS, 0.1, seed, torch.float32)
    torch.library.opcheck(residual_layer_norm_backward_triton_op, (cotangent, x, residual, weight, stats, 0.1, seed))


def test_triton_op_autograd_equals_its_kernels(triton_device):
    """Through the registry's entry: the output and the gradients of the kernels called directly, with dropout."""
    x, residual, weight, bias, cotangent = (t.float().to(triton_device) for t in make_inputs((4, 5, 33), seed=8))
    leaves = [t.clone().requires_grad_() for t in (x, residual, weight, bias)]
    torch.manual_seed(11)
    out = residual_layer_norm_triton(*leaves, EPS, 0.25)
    grads = torch.autograd.grad(out, leaves, cotangent)
    torch.manual_seed(11)  # the entry draws its seed from torch's generator: the same one again
    seed = torch.randint(0, 2**31 - 1, (1,), device=triton_device)
    want, stats = kernel.residual_layer_norm_forward(x, residual, weight, bias, EPS, 0.25, seed, torch.float32)
    want_grads = kernel.residual_layer_norm_backward(cotangent, x, residual, weight, stats, 0.25, seed)
    assert torch.equal(out, want) and all(torch.equal(a, b) for a, b in zip(grads, want_grads, strict=True))


def test_text_transformer_through_the_kernel_equals_the_reference(triton_device, monkeypatch):
    """BLIP's tiny text transformer in its image-grounded mode (self-attention, cross-attention and feed-forward, each
    ending in the op), padded captions: its hidden states and every parameter's and the image tokens' gradients equal
    the reference's (fp32, 1e-5; dropout off, whose numbers differ by design)."""
    let_backend_run_on(monkeypatch, residual_layer_norm_op, ("cpu", "cuda"))
    config = tiny_config()
    config.text.hidden_dropout = config.text.attention_dropout = 0.0
    torch.manual_seed(0)
    text = TextTransformer(config.text, encoder_width=config.vision.width).to(triton_device).train()
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, 999, (3, 7), generator=generator).to(triton_device)
    mask = torch.ones_like(input_ids)
    mask[1, 4:] = 0
    image = torch.randn(3, 5, config.vision.width, generator=generator).to(triton_device).requires_grad_()
    results = {}
    for impl in ("reference", "reference,residual_layer_norm=triton"):
        with ops.impl_scope(impl):
            assert residual_layer_norm_op.select(torch.device(triton_device)) == impl.rpartition("=")[2]
            hidden = text(input_ids, mask, image)
        params = [image, *text.parameters()]
        grads = torch.autograd.grad(hidden.square().mean(), params, allow_unused=True)
        results[impl] = hidden.detach(), torch.cat([g.flatten() for g in grads if g is not None])
    (ref_hidden, ref_grads), (hidden, grads) = results.values()
    assert_close(hidden, ref_hidden, what="hidden states")
    assert_close(grads, ref_grads, what="gradients")


# -- GPU: bf16, BLIP's shapes --------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_triton_bf16_against_the_truth_on_gpu(dropout_p):
    x, residual, weight, bias, cotangent = make_inputs((96, 30, 768), seed=9)
    seed = torch.tensor([3], device="cuda")
    keep = kernel.dropout_keep(x.shape, dropout_p, seed).cpu() if dropout_p else None
    truth = reference(x, residual, weight, bias, cotangent, dropout_p, keep)
    low = [t.to("cuda", torch.bfloat16) for t in (x, residual, weight, bias, cotangent)]
    low_truth = reference(*low, dropout_p, None if keep is None else keep.cuda())
    out, stats = kernel.residual_layer_norm_forward(*low[:4], EPS, dropout_p, seed, torch.bfloat16)
    grads = kernel.residual_layer_norm_backward(low[4], low[0], low[1], low[2], stats, dropout_p, seed)
    assert_close(out, truth[0], low_truth[0], torch.bfloat16, "output")
    for got, want, want_low in zip(grads, truth[1], low_truth[1], strict=True):
        assert_close(got, want, want_low, torch.bfloat16)
