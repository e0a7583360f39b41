"""Attention: the reference against an independent formula, and every fast backend against the
reference, forward and gradients, over BLIP's lengths, masks and dtypes.

Tolerances (max abs error, outputs of unit-scale random inputs):
* reference vs the independent fp64 formula: 1e-5 in fp32 (the reference computes in fp32);
* fast vs reference: 2e-5 fp32, 2e-3 fp16, 2e-2 bf16 (forward), x2 for gradients.
"""

import math

import pytest
import torch

from blip_fast import ops
from blip_fast.ops.attention import attention_ref, attention_sdpa
from blip_fast.shapes import BASE_HEADS, FINETUNE_TEXT_LENGTH, HEAD_DIM, IMAGE_TOKENS_224, IMAGE_TOKENS_384

TEXT, IMAGE = FINETUNE_TEXT_LENGTH, IMAGE_TOKENS_224
LENGTHS = [1, 7, TEXT, 40, 97, IMAGE]
# max abs errors against the reference in the same dtype (unit-scale inputs): no fp32 truth here to measure the
# low dtype's own error by, so unlike blip_fast.tolerances.PARITY_FLOOR these bounds stand alone (bf16: 2e-2)
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def naive_attention(q, k, v, key_padding_mask=None, causal=False):
    """The original BERT formulation in fp64: additive -10000 mask, softmax, weighted sum."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_padding_mask is not None:
        scores = scores + (1.0 - key_padding_mask[:, None, None, :].double()) * -10000.0
    if causal:
        lq, lk = q.shape[2], k.shape[2]
        scores = scores + (1.0 - torch.ones(lq, lk).tril().double()) * -10000.0
    return scores.softmax(-1) @ v


def make_inputs(batch, heads, lq, lk, dim, dtype, mask, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, dim, generator=g).to(dtype) for n in (lq, lk, lk))
    key_padding_mask = None
    if mask:
        lengths = torch.randint(1, lk + 1, (batch,), generator=g)
        key_padding_mask = torch.arange(lk)[None] < lengths[:, None]
    return q, k, v, key_padding_mask


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("mode", ["bidirectional", "padded", "causal", "causal_padded"])
def test_reference_matches_the_original_formula(length, mode):
    mask, causal = "padded" in mode, "causal" in mode
    q, k, v, kpm = make_inputs(3, 2, length, length, 16, torch.float32, mask)
    out = attention_ref(q, k, v, kpm, causal)
    expected = naive_attention(q, k, v, kpm, causal)
    assert (out.double() - expected).abs().max() < 1e-5


@pytest.mark.parametrize("lq,lk", [(1, IMAGE), (7, TEXT), (TEXT, IMAGE), (13, IMAGE_TOKENS_384)])
def test_cross_attention_reference(lq, lk):
    q, k, v, kpm = make_inputs(2, 3, lq, lk, 16, torch.float32, mask=True)
    assert (attention_ref(q, k, v, kpm).double() - naive_attention(q, k, v, kpm)).abs().max() < 1e-5


def test_fully_masked_rows_are_zero_in_every_backend():
    q, k, v, _ = make_inputs(2, 2, 5, 5, 8, torch.float32, mask=False)
    kpm = torch.ones(2, 5, dtype=torch.bool)
    kpm[1] = False
    for fn in (attention_ref, attention_sdpa):
        out = fn(q, k, v, kpm)
        assert torch.isfinite(out).all()
        assert out[1].abs().max() == 0
        assert (out[0] - attention_ref(q[:1], k[:1], v[:1])[0]).abs().max() < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lq,lk,mask,causal", [
    (1, 1, False, False), (7, 7, True, False), (TEXT, TEXT, True, True), (40, 40, False, True),
    (97, 97, True, False), (TEXT, IMAGE, False, False), (7, TEXT, True, False), (IMAGE, IMAGE, False, False),
])
def test_fast_backends_match_reference(dtype, lq, lk, mask, causal):
    q, k, v, kpm = make_inputs(2, 3, lq, lk, 32, dtype, mask, seed=lq * 1000 + lk)
    cotangent = torch.randn(2, 3, lq, 32, generator=torch.Generator().manual_seed(7)).to(dtype)
    results = {}
    for backend in ops.OPS["attention"].available(q.device):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = ops.OPS["attention"].function(backend)(*leaves, kpm, causal)
        grads = torch.autograd.grad(out, leaves, cotangent)
        results[backend] = (out, grads)
    ref_out, ref_grads = results.pop("reference")
    assert results, "no fast backend to compare"
    for backend, (out, grads) in results.items():
        err = (out.float() - ref_out.float()).abs().max().item()
        assert err <= TOL[dtype], f"{backend} forward error {err}"
        for name, g, rg in zip("qkv", grads, ref_grads, strict=True):
            gerr = (g.float() - rg.float()).abs().max().item()
            assert gerr <= 2 * TOL[dtype] * max(1.0, rg.float().abs().max().item()), f"{backend} d{name} {gerr}"


def test_dropout_is_applied_only_when_asked():
    q, k, v, _ = make_inputs(1, 1, 64, 64, 8, torch.float32, mask=False)
    assert torch.equal(attention_ref(q, k, v, dropout_p=0.0), attention_ref(q, k, v))
    dropped = attention_ref(q, k, v, dropout_p=0.5)
    assert not torch.allclose(dropped, attention_ref(q, k, v))


def test_bad_shapes_are_rejected():
    q, k, v, _ = make_inputs(2, 2, 5, 7, 8, torch.float32, mask=False)
    with pytest.raises(ValueError, match="causal attention needs Lq == Lk"):
        attention_ref(q, k, v, causal=True)
    with pytest.raises(ValueError, match="key_padding_mask must be bool"):
        attention_ref(q, k, v, torch.ones(2, 7))
    with pytest.raises(ValueError, match="shapes disagree"):
        attention_ref(q, k[:, :1], v[:, :1])


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_masked_attention_prefers_the_memory_efficient_kernel_on_gpu(causal):
    """Padded text runs on the memory-efficient kernel (the faster one there, docs/benchmarks.md); unmasked calls
    on torch's choice."""
    q, k, v, kpm = (t.cuda() for t in make_inputs(32, BASE_HEADS, TEXT, TEXT, HEAD_DIM, torch.bfloat16, mask=True))
    ops_run = {}
    for name, mask in (("masked", kpm), ("unmasked", None)):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            attention_sdpa(*leaves, mask, causal).float().sum().backward()
        ops_run[name] = {e.name for e in prof.events() if e.name.startswith("aten::_scaled_dot_product")}
    assert "aten::_scaled_dot_product_efficient_attention" in ops_run["masked"], ops_run
    assert ops_run["unmasked"], ops_run


@pytest.mark.gpu
def test_fully_masked_rows_have_zero_output_and_finite_gradients_on_gpu():
    q, k, v, _ = (t.cuda() if t is not None else None for t in make_inputs(2, 2, 5, 5, 8, torch.bfloat16, False))
    kpm = torch.ones(2, 5, dtype=torch.bool, device="cuda")
    kpm[1] = False
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = attention_sdpa(*leaves, kpm)
    out.float().sum().backward()
    assert out[1].abs().max() == 0
    assert all(torch.isfinite(t.grad).all() for t in leaves)
