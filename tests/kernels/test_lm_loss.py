"""The fused linear + cross-entropy LM loss (Triton) against its reference, forward and gradients.

Shapes sweep 1 row, odd row counts, vocabularies past one column block (and, with the block shrunk to
16 columns, a partial last block), chunks of 1 row up to the whole batch; targets with no padding,
~45% padding and all but one row padded; label smoothing 0, 0.1 and 1; with and without the bias.

Tolerances, all against the reference evaluated in fp64 on the same inputs:

* fp32: relative error (max |diff| / max |ref|) <= 1e-5 for the loss, per-row losses and every gradient;
* fp16: flash-attention's rule, as ``blip-fast parity``: the kernel's error is at most twice that of the
  reference evaluated in fp16 itself, plus ``2e-3 * max |ref|`` for summation order;
* bf16: the same rule on the GPU only (the interpreter cannot hold bf16).
"""

import pytest
import torch
from backend_helpers import cuda_peak_bytes, let_backend_run_on
from tensor_checks import assert_close_to_truth as assert_close
from tensor_checks import rel_err
from torch.utils.flop_counter import FlopCounterMode

from blip_fast import ops
from blip_fast.config import TextConfig
from blip_fast.kernels import lm_loss as kernel
from blip_fast.models.med import TextDecoder
from blip_fast.ops.lm_loss import (
    lm_loss_mean_triton_op,
    lm_loss_op,
    lm_loss_rows_backward_triton_op,
    lm_loss_rows_triton_op,
    lm_loss_triton,
)
from blip_fast.shapes import BASE_WIDTH, FINETUNE_TEXT_LENGTH, PRETRAIN_BATCH, VOCAB_SIZE

# (rows, hidden, vocab, chunk_rows): None = the default chunking (one chunk at these sizes)
SHAPES = [(1, 8, 3, None), (7, 16, 97, 3), (35, 24, 1000, 16), (97, 32, 5003, 40), (13, 8, 97, 1)]


def make_inputs(rows, hidden, vocab, pad="some", bias=True, dtype=torch.float64, device="cpu"):
    h = torch.randn(rows, hidden, dtype=torch.float64)
    w = torch.randn(vocab, hidden, dtype=torch.float64) / hidden**0.5 * 2  # logits of a few units
    b = torch.randn(vocab, dtype=torch.float64) * 0.5 if bias else None
    t = torch.randint(0, vocab, (rows,))
    if pad == "some":
        t[torch.rand(rows) < 0.45] = -100
    elif pad == "all_but_one":
        t[1:] = -100
    t[0] = vocab - 1  # one real target, in the last column
    floats = [x.to(device, dtype) if x is not None else None for x in (h, w, b)]
    return (*floats, t.to(device))


def reference(h, w, b, t, smoothing, reduction, cotangent=None):
    """Reference loss and gradients of (h, w, b), computed in h's dtype (fp64 for the truth)."""
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in (h, w, b)]
    loss = kernel.lm_loss_ref(leaves[0], leaves[1], leaves[2], t, smoothing, reduction)
    present = [x for x in leaves if x is not None]
    grads = torch.autograd.grad(loss, present, cotangent)
    return loss.detach(), list(grads)


def check_mean(device, dtype, shape, smoothing, pad, bias):
    rows, hidden, vocab, chunk = shape
    h, w, b, t = make_inputs(rows, hidden, vocab, pad, bias, torch.float64, device)
    truth_loss, truth_grads = reference(h, w, b, t, smoothing, "mean")
    low = [x.to(dtype) if x is not None else None for x in (h, w, b)]
    low_loss, low_grads = reference(*low, t, smoothing, "mean")
    loss, *grads = kernel.linear_cross_entropy_mean(*low, t, smoothing, True, chunk)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss, truth_loss, low_loss, dtype, "loss")
    present = [(name, g) for name, g in zip(("hidden", "weight", "bias"), grads, strict=True) if g is not None]
    for (name, g), truth, g_low in zip(present, truth_grads, low_grads, strict=True):
        assert g.dtype == dtype
        assert_close(g, truth, g_low, dtype, f"grad {name}")
    assert (grads[2] is None) == (not bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("smoothing,pad,bias", [(0.1, "some", True), (0.0, "none", False),
                                                (1.0, "all_but_one", True)])
def test_triton_mean_loss_and_gradients_match_reference(triton_device, dtype, shape, smoothing, pad, bias):
    check_mean(triton_device, dtype, shape, smoothing, pad, bias)


def test_triton_many_column_blocks(triton_device, monkeypatch):
    monkeypatch.setattr(kernel, "MAX_BLOCK_V", 16)  # 97 columns: 6 full blocks and one of a single column
    for dtype in (torch.float32, torch.float16):
        check_mean(triton_device, dtype, (11, 8, 97, 4), 0.1, "some", True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES[1:4])
def test_triton_per_row_losses_and_their_backward_match_reference(triton_device, dtype, shape):
    rows, hidden, vocab, chunk = shape
    h, w, b, t = make_inputs(rows, hidden, vocab, "some", True, torch.float64, triton_device)
    cotangent = torch.randn(rows, dtype=torch.float64, device=triton_device)
    truth_rows, truth_grads = reference(h, w, b, t, 0.1, "none", cotangent)
    low = [x.to(dtype) for x in (h, w, b)]
    low_rows, low_grads = reference(*low, t, 0.1, "none", cotangent.float())
    loss_rows = kernel.linear_cross_entropy_rows(*low, t, 0.1, chunk)
    assert loss_rows.dtype == torch.float32 and torch.all(loss_rows[t == -100] == 0)
    assert_close(loss_rows, truth_rows, low_rows, dtype, "per-row losses")
    grads = kernel.linear_cross_entropy_backward(*low, t, 0.1, cotangent.float(), chunk)
    for name, g, truth, g_low in zip(("hidden", "weight", "bias"), grads, truth_grads, low_grads, strict=True):
        assert_close(g, truth, g_low, dtype, f"grad {name}")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_op_autograd_equals_reference(triton_device, reduction):
    """The registered backends' entry: autograd through the custom ops, fp32."""
    h, w, b, t = make_inputs(35, 24, 1000, "some", True, torch.float32, triton_device)
    cotangent = None if reduction == "mean" else torch.randn(35, device=triton_device)
    expected, expected_grads = reference(h, w, b, t, 0.1, reduction, cotangent)
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    loss = lm_loss_triton(*leaves, t, 0.1, reduction)
    grads = torch.autograd.grad(loss, leaves, cotangent)
    assert rel_err(loss, expected) < 1e-5
    for g, e in zip(grads, expected_grads, strict=True):
        assert rel_err(g, e) < 1e-5


def test_triton_no_gradients_without_autograd(triton_device):
    h, w, b, t = make_inputs(7, 16, 97, "some", True, torch.float32, triton_device)
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    with torch.no_grad():
        loss = lm_loss_triton(*leaves, t, 0.1, "mean")
    assert loss.grad_fn is None and rel_err(loss, kernel.lm_loss_ref(h, w, b, t, 0.1)) < 1e-5
    # the op asked not to compute gradients refuses a backward instead of returning wrong ones
    loss, grad_hidden, _, _ = lm_loss_mean_triton_op(*leaves, t, 0.1, False)
    assert grad_hidden.numel() == 0
    with pytest.raises(RuntimeError, match="compute_grads=False"):
        loss.backward()


def test_triton_every_target_ignored(triton_device):
    """As F.cross_entropy: the mean of no tokens is NaN; the kernel's gradients are then zero."""
    h, w, b, t = make_inputs(5, 8, 97, "none", True, torch.float32, triton_device)
    t[:] = -100
    loss, grad_hidden, grad_weight, grad_bias = kernel.linear_cross_entropy_mean(h, w, b, t, 0.1, True)
    assert torch.isnan(loss) and torch.isnan(kernel.lm_loss_ref(h, w, b, t, 0.1))
    for g in (grad_hidden, grad_weight, grad_bias):
        assert torch.all(g == 0)
    assert torch.all(kernel.linear_cross_entropy_rows(h, w, b, t, 0.1) == 0)


def test_triton_fp16_mean_gradients_under_a_loss_scale(triton_device):
    """fp16 with a large incoming gradient (a GradScaler's 65536): the mean's 1 / count is applied in fp32 after the
    GEMMs, not folded into the fp16 logit gradient, where (softmax - target) / count at 2,000 rows and 4,096 classes
    falls below fp16's normal range (folded, the hidden states' gradient missed the bound by 1.5x). The fp16 rule of
    this file against the fp64 truth."""
    h, w, b, t = make_inputs(2000, 16, 4096, "none", True, torch.float64, "cpu")
    scale = torch.tensor(65536.0, dtype=torch.float64)
    _, truth = reference(h, w, b, t, 0.1, "mean", scale)
    low = [x.to(triton_device, torch.float16) for x in (h, w, b)]
    t = t.to(triton_device)
    _, low_grads = reference(*low, t, 0.1, "mean", scale.to(triton_device, torch.float32))
    leaves = [x.clone().requires_grad_() for x in low]
    grads = torch.autograd.grad(lm_loss_triton(*leaves, t, 0.1, "mean") * 65536.0, leaves)
    for name, g, want, want_low in zip(("hidden", "weight", "bias"), grads, truth, low_grads, strict=True):
        assert_close(g, want, want_low, torch.float16, f"grad {name}")


def test_triton_autocast_casts_like_linear(triton_device):
    """Under autocast the entry casts to the autocast dtype as F.linear does; fp32 leaves get fp32 gradients."""
    h, w, b, t = make_inputs(35, 24, 1000, "some", True, torch.float32, triton_device)
    results = []
    for loss_fn in (kernel.lm_loss_ref, lm_loss_triton):
        leaves = [x.clone().requires_grad_() for x in (h, w, b)]
        with torch.autocast(triton_device, dtype=torch.float16):
            loss = loss_fn(*leaves, t, 0.1, "mean")
        grads = torch.autograd.grad(loss, leaves)
        assert all(g.dtype == torch.float32 for g in grads)
        results.append((loss, grads))
    (ref_loss, ref_grads), (loss, grads) = results
    assert rel_err(loss, ref_loss) < 1e-3
    for g, e in zip(grads, ref_grads, strict=True):
        assert rel_err(g, e) < 2e-3  # both cast the fp32 gradients from fp16 ones


def test_triton_rejects_bad_inputs(triton_device):
    h, w, b, t = make_inputs(7, 16, 97, "some", True, torch.float32, triton_device)
    cases = [
        ((h, w[:, :8], b, t), "disagree"),
        ((h, w, b[:5], t), "bias must be"),
        ((h, w, b, t.int()), "targets must be int64"),
        ((h, w.double(), b, t), "share one of"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            lm_loss_triton(*args, 0.1, "mean")
    with pytest.raises(ValueError, match="label_smoothing"):
        lm_loss_triton(h, w, b, t, 1.5, "mean")
    with pytest.raises(ValueError, match="reduction"):
        lm_loss_triton(h, w, b, t, 0.1, "sum")


def test_triton_ops_pass_opcheck(triton_device):
    h, w, b, t = make_inputs(7, 16, 97, "some", True, torch.float32, triton_device)
    h, w, b = (x.requires_grad_() for x in (h, w, b))
    torch.library.opcheck(lm_loss_mean_triton_op, (h, w, b, t, 0.1, True))
    torch.library.opcheck(lm_loss_mean_triton_op, (h.detach(), w.detach(), None, t, 0.0, False))
    torch.library.opcheck(lm_loss_rows_triton_op, (h, w, b, t, 0.1))
    torch.library.opcheck(lm_loss_rows_backward_triton_op, (h.detach(), w.detach(), None, t, 0.1,
                                                            torch.randn(7, device=triton_device)))
    # transposed views: the kernels make them contiguous, and the fake implementations say so (compile needs it)
    h_t, w_t = (x.detach().t().contiguous().t().requires_grad_() for x in (h, w))
    assert not h_t.is_contiguous() and not w_t.is_contiguous()
    torch.library.opcheck(lm_loss_mean_triton_op, (h_t, w_t, b, t, 0.1, True))
    torch.library.opcheck(lm_loss_rows_backward_triton_op, (h_t.detach(), w_t.detach(), b.detach(), t, 0.1,
                                                            torch.randn(7, device=triton_device)))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_fullgraph_compile_matches_eager(triton_device, reduction):
    """The ops are opaque nodes of one compiled graph; values and gradients equal eager."""
    torch._dynamo.reset()
    h, w, b, t = make_inputs(13, 16, 97, "some", True, torch.float32, triton_device)

    def head_loss(x, weight, bias, targets):  # the LM head's LayerNorm, then the loss
        return lm_loss_triton(torch.nn.functional.layer_norm(x, x.shape[-1:]), weight, bias, targets, 0.1,
                              reduction).sum()

    compiled = torch.compile(head_loss, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (head_loss, compiled):
        leaves = [x.clone().requires_grad_() for x in (h, w, b)]
        loss = fn(*leaves, t)
        results.append((loss, torch.autograd.grad(loss, leaves)))
    (eager, eager_grads), (out, grads) = results
    assert rel_err(out, eager) < 1e-6
    for g, e in zip(grads, eager_grads, strict=True):
        assert rel_err(g, e) < 1e-6
    torch._dynamo.reset()


def test_triton_flop_counter_sees_the_fused_gemms(triton_device):
    """FlopCounterMode counts the fused GEMMs: 2NHV forward and 4NHV backward as the reference; per-row
    losses recompute their logits in the backward (2NHV more)."""
    h, w, b, t = make_inputs(13, 16, 97, "some", True, torch.float32, triton_device)
    counts = []
    for reduction in ("mean", "none"):
        for loss_fn in (kernel.lm_loss_ref, lm_loss_triton):
            leaves = [x.clone().requires_grad_() for x in (h, w, b)]
            with FlopCounterMode(display=False) as counter:
                loss_fn(*leaves, t, 0.1, reduction).sum().backward()
            counts.append(counter.get_total_flops())
    flops = 2 * 13 * 16 * 97
    assert counts == [3 * flops, 3 * flops, 3 * flops, 4 * flops]


@pytest.fixture
def triton_lm_loss_on_cpu(triton_device, monkeypatch):
    """Lets the registry pick the Triton LM loss for CPU tensors (the interpreter) as it does on CUDA."""
    let_backend_run_on(monkeypatch, lm_loss_op, ("cpu", "cuda"))
    return triton_device


def test_triton_decoder_trains_the_same(triton_lm_loss_on_cpu):
    """Liger's mini-model check on BLIP's decoder: the same losses and updates at every step, fp32."""
    device = triton_lm_loss_on_cpu
    config = TextConfig(vocab_size=301, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                        max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0,
                        bos_token_id=299, enc_token_id=300)
    image_embeds = torch.randn(3, 5, 48, device=device)
    input_ids = torch.randint(1, 299, (3, 11), device=device)
    mask = torch.ones(3, 11, dtype=torch.long, device=device)
    mask[1, 7:] = 0
    targets = input_ids.masked_fill(mask == 0, -100)
    curves = {}
    for impl in ("reference", "triton"):
        torch.manual_seed(0)
        decoder = TextDecoder(config, encoder_width=48).to(device)
        optimizer = torch.optim.AdamW(decoder.parameters(), lr=1e-3)
        losses = []
        with ops.impl_scope(impl):
            assert lm_loss_op.select(torch.device(device)) == impl
            for _ in range(5):
                loss = decoder.loss(input_ids, mask, image_embeds, None, targets)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            per_sample = decoder.loss(input_ids, mask, image_embeds, None, targets, reduction="sum_per_sample")
        curves[impl] = (losses, per_sample.detach(), [p.detach().clone() for p in decoder.parameters()])
    (ref_losses, ref_per_sample, ref_params), (losses, per_sample, params) = curves["reference"], curves["triton"]
    for step, (a, e) in enumerate(zip(losses, ref_losses, strict=True)):
        assert abs(a - e) <= 1e-5 * abs(e), f"step {step}: {a} vs {e}"
    assert rel_err(per_sample, ref_per_sample) < 1e-5
    # Weights as a whole (max |diff| over the largest weight). Not per tensor: the self-attention key biases
    # have an exactly zero gradient (softmax ignores a shift), so AdamW turns their rounding noise into
    # ~1e-7 steps that differ between any two summation orders.
    assert rel_err(torch.cat([p.flatten() for p in params]), torch.cat([e.flatten() for e in ref_params])) < 1e-5


# -- GPU: bf16, BLIP's shapes --------------------------------------------------------------------


@pytest.mark.gpu
def test_triton_holds_less_memory_than_the_reference_on_gpu():
    """The point of fusing: at BLIP's batch the logits (and their fp32 copies) are never all held at once."""
    tokens = PRETRAIN_BATCH * (FINETUNE_TEXT_LENGTH - 1)  # the targets of a batch of captions: all but the first
    h, w, b, t = make_inputs(tokens, BASE_WIDTH, VOCAB_SIZE, "some", True, torch.bfloat16, "cuda")
    peaks = {}
    for name, loss_fn in (("reference", kernel.lm_loss_ref), ("triton", lm_loss_triton)):
        leaves = [x.clone().requires_grad_() for x in (h, w, b)]
        peaks[name] = cuda_peak_bytes(lambda fn=loss_fn, leaves=leaves: fn(*leaves, t, 0.1, "mean").backward())
    # the reference holds bf16 logits, their fp32 copy, fp32 log-softmax and gradients: > 1 GB here
    assert peaks["triton"] < peaks["reference"] / 3, peaks
