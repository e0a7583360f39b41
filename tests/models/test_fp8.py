"""FP8 matmuls for the ViT's linear layers (blip_fast.models.fp8), on the CPU (``torch._scaled_mm`` runs there too).

The matmuls are checked against the same quantisation simulated in fp64 -- each operand quantised with the same
per-tensor scale and dequantised, then multiplied exactly -- within 1e-5 relative: what is left is fp32 accumulation,
so a wrong scale, layout or format fails by orders of magnitude. How far FP8 is from the unquantised product (about 5%
per element of a random matrix) is the format's, not a tolerance of these tests; whether training follows bf16 is
``benchmarks/bench_fp8.py``'s loss-curve check on a GPU, and at the tiny model's scale here.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blip_fast.config import tiny_config
from blip_fast.models import BlipPretrain
from blip_fast.models.fp8 import E4M3, E5M2, Fp8Linear, dequantize, quantize, use_fp8_linears
from blip_fast.models.vit import VisionTransformer
from blip_fast.train.config import TrainConfig
from blip_fast.train.distributed import DistributedContext
from blip_fast.train.speed import apply_speed


def simulated(x, weight, bias, grad):
    """Output and gradients (x, weight, bias) of the FP8 layer with its quantisation done in fp64."""
    rows = x.reshape(-1, x.shape[-1])
    xq, wq = (dequantize(*quantize(t, E4M3)).double() for t in (rows, weight))
    g = grad.reshape(-1, grad.shape[-1])
    gq = dequantize(*quantize(g, E5M2)).double()
    out = xq @ wq.T + bias.double()
    return out.view(*x.shape[:-1], -1), (gq @ wq).view(x.shape), gq.T @ xq, g.double().sum(0)


def rel(actual, expected):
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("fp8", [E4M3, E5M2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("magnitude", [1e-4, 1.0, 1e4])
def test_per_tensor_scales_fit_any_magnitude_to_the_format(fp8, magnitude):
    """The largest magnitude lands on the format's largest, and each element comes back within half a unit in the
    last place (e4m3: 3 mantissa bits, 2^-4 relative; e5m2: 2 bits, 2^-3) of its size or of the smallest normal's --
    also for activations far below 1 or above the format's range, which unscaled would flush to 0 or overflow."""
    t = torch.randn(64, 48, generator=torch.Generator().manual_seed(2)) * magnitude
    quantised, scale = quantize(t, fp8)
    assert quantised.dtype == fp8 and quantised.float().abs().max() == torch.finfo(fp8).max
    back = dequantize(quantised, scale)
    half_ulp = 2.0 ** -(4 if fp8 == E4M3 else 3)
    floor = torch.finfo(fp8).smallest_normal * float(scale)
    assert ((back - t).abs() <= half_ulp * t.abs() + floor).all()


@pytest.mark.parametrize("shape", [(16, 32), (3, 17, 64), (5, 48)], ids=str)
@pytest.mark.parametrize("out_features", [16, 80])
def test_fp8_linear_is_its_quantisation_exactly(shape, out_features):
    """Rows a multiple of 16 and not (padded: 51 and 5 rows), 3-D input, bias; fp32 activations."""
    generator = torch.Generator().manual_seed(0)
    layer = nn.Linear(shape[-1], out_features)
    fp8 = Fp8Linear.from_linear(layer)
    x = torch.randn(*shape, generator=generator, requires_grad=True)
    out = fp8(x)
    grad = torch.randn(out.shape, generator=generator)
    dx, dw, db = torch.autograd.grad(out, [x, layer.weight, layer.bias], grad)
    want = simulated(x.detach(), layer.weight.detach(), layer.bias.detach(), grad)
    assert out.dtype == torch.float32 and out.shape == (*shape[:-1], out_features)
    for name, got, expected in zip(("out", "dx", "dw", "db"), (out, dx, dw, db), want, strict=True):
        assert rel(got, expected) < 1e-5, name
    assert rel(out, F.linear(x, layer.weight, layer.bias).detach().double()) > 1e-3  # FP8 really ran


def test_fp8_linear_under_autocast_returns_the_autocast_dtype():
    generator = torch.Generator().manual_seed(1)
    layer = nn.Linear(32, 48)
    x = torch.randn(4, 20, 32, generator=generator, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = Fp8Linear.from_linear(layer)(x)
    assert out.dtype == torch.bfloat16
    grad = torch.randn(out.shape, generator=generator)
    dx, dw = torch.autograd.grad(out, [x, layer.weight], grad.bfloat16())
    assert dx.dtype == torch.float32 and dw.dtype == torch.float32  # each its input's dtype
    want = simulated(x.detach(), layer.weight.detach(), layer.bias.detach(), grad.bfloat16().float())
    assert rel(out, want[0]) < 1e-2  # bf16's rounding of the fp32-accumulated output
    assert rel(dw, want[2]) < 1e-5


def test_widths_off_the_granule_run_as_linear_layers():
    layer = nn.Linear(24, 40)
    x = torch.randn(7, 24)
    assert torch.equal(Fp8Linear.from_linear(layer)(x), layer(x))


def test_the_vit_blocks_swap_their_linear_layers_and_keep_their_parameters():
    model = BlipPretrain(tiny_config())
    vit = model.visual_encoder
    before = dict(vit.named_parameters())
    keys = list(model.state_dict())
    assert use_fp8_linears(vit) == 4 * len(vit.blocks)
    assert all(type(m) is Fp8Linear for block in vit.blocks for m in block.modules() if isinstance(m, nn.Linear))
    assert all(p is before[name] for name, p in vit.named_parameters())
    assert list(model.state_dict()) == keys
    assert not any(isinstance(m, Fp8Linear) for m in model.text_encoder.modules())


def test_apply_speed_swaps_both_vision_encoders():
    model = BlipPretrain(tiny_config())
    apply_speed(model, TrainConfig(fp8_vit=True), DistributedContext())
    vits = [m for m in model.modules() if isinstance(m, VisionTransformer)]
    assert len(vits) == 2 and all(isinstance(vit.blocks[0].mlp.fc1, Fp8Linear) for vit in vits)


def test_tiny_pretraining_follows_its_loss_curve_in_fp8():
    """The loss-curve check at the tiny model's scale: 24 AdamW steps from one start on the same batches, ViT in
    FP8 and in fp32. ITM and LM fall in both, and each loss, averaged over 8-step windows, stays within 5% of fp32's
    (observed on a 2-core x86 CPU, torch 2.13: 0.7% at most)."""
    config = tiny_config(image_size=64)
    config.queue_size = 32
    torch.manual_seed(0)
    reference = BlipPretrain(config)
    fp8 = copy.deepcopy(reference)
    use_fp8_linears(fp8.visual_encoder)
    use_fp8_linears(fp8.visual_encoder_m)
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(4):
        ids = torch.randint(1000, 1100, (8, 10), generator=generator)
        ids[:, 0] = config.text.bos_token_id
        batches.append((torch.randn(8, 3, 64, 64, generator=generator), ids, torch.ones_like(ids)))
    curves = []
    for model in (reference, fp8):
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
        losses = []
        for step in range(24):
            images, ids, mask = batches[step % len(batches)]
            out = model(images, ids, mask, alpha=0.4, generator=torch.Generator().manual_seed(step))
            optimizer.zero_grad()
            sum(out.values()).backward()
            optimizer.step()
            losses.append(torch.stack([out[k].detach() for k in ("itc", "itm", "lm")]))
        curves.append(torch.stack(losses).view(3, 8, 3).mean(1))  # (window, loss)
    reference_curve, fp8_curve = curves
    # ITM and LM fall (ITC rises while the queue fills with the batch's own features)
    assert (reference_curve[-1, 1:] < reference_curve[0, 1:]).all() and (fp8_curve[-1, 1:] < fp8_curve[0, 1:]).all()
    assert ((fp8_curve - reference_curve).abs() / reference_curve).max() < 0.05, (reference_curve, fp8_curve)
