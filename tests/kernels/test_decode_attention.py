"""The decoding step's attention kernels (Triton) against the reference, and generation through them.

Shapes sweep one query to more than a query block (16), keys from none to several tiles, head sizes that are not
powers of two, key splits from one to more than there are tiles, padding masks with a row that sees no key, the
static step's broadcast prefix mask (stride 0), and cache slices read through their strides.

Tolerances, against the reference evaluated in fp64 on the same inputs: fp32 within 1e-5 relative; fp16 by
flash-attention's rule (the kernel's error at most twice that of the reference evaluated in fp16, plus ``2e-3 * max
|ref|``); bf16 the same rule on the GPU only (the interpreter cannot hold bf16). Generation through the kernel
writes exactly the tokens it writes through SDPA (fp32, tiny model).
"""

import pytest
import torch
from backend_helpers import let_backend_run_on
from tensor_checks import assert_close_to_truth as assert_close

from blip_fast import ops
from blip_fast.config import tiny_config
from blip_fast.kernels import decode_attention as kernel
from blip_fast.models import GenerationConfig, build_model
from blip_fast.ops.decode_attention import decode_attention_op, decode_attention_triton, decode_attention_triton_op

# (rows, heads, queries, keys, head_dim, mask, splits): mask "none", "padding" (row 0 sees no key) or "prefix"
SHAPES = [
    (2, 3, 1, 37, 16, "padding", None),
    (3, 2, 5, 100, 24, "padding", 3),
    (1, 1, 20, 9, 16, "none", 1),  # two query blocks, one partial
    (2, 2, 3, 64, 64, "none", 4),  # keys an exact number of tiles
    (4, 2, 1, 30, 16, "prefix", 2),
    (1, 2, 3, 50, 40, "none", 9),  # more splits asked than tiles
    (2, 1, 1, 0, 16, "none", None),  # nothing cached
]
TILING = kernel.DecodeTiling(block_n=16)  # several tiles at the interpreter's small shapes


def make_inputs(rows, heads, queries, keys, dim, mask, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def t(length):
        return torch.randn(rows, heads, length, dim, generator=generator, dtype=torch.float64)

    q, k, v = t(queries), t(keys), t(keys)
    key_padding_mask = None
    if mask == "padding":
        key_padding_mask = torch.rand(rows, keys, generator=generator) < 0.7
        key_padding_mask[0] = False
    elif mask == "prefix":
        key_padding_mask = (torch.arange(keys) < keys // 2 + 1)[None].expand(rows, keys)
    return q, k, v, key_padding_mask


def on(device, dtype, *tensors):
    return [None if x is None else x.to(device, dtype if x.is_floating_point() else x.dtype) for x in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_reference(triton_device, dtype, shape):
    *sizes, splits = shape
    q, k, v, mask = make_inputs(*sizes)
    truth = kernel.decode_attention_ref(q, k, v, mask)
    low = on(triton_device, dtype, q, k, v, mask)
    out = kernel.decode_attention_forward(*low, splits=splits, tiling=TILING)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, truth, kernel.decode_attention_ref(*low), dtype, str(shape))
    if mask is not None and not mask[0].any():
        assert not out[0].any(), "a row that sees no key returns zeros"


def test_triton_splits_agree_and_repeat_bitwise(triton_device):
    """Every split count gives the same attention to rounding, and the same split count the same bits twice (the
    combine merges splits in a fixed order)."""
    q, k, v, mask = on(triton_device, torch.float32, *make_inputs(3, 2, 4, 90, 16, "padding", seed=1))
    outs = {s: kernel.decode_attention_forward(q, k, v, mask, splits=s, tiling=TILING) for s in (1, 2, 3, 6)}
    for splits, out in outs.items():
        torch.testing.assert_close(out, outs[1], rtol=1e-6, atol=1e-6, msg=f"splits={splits}")
        assert torch.equal(out, kernel.decode_attention_forward(q, k, v, mask, splits=splits, tiling=TILING))


def test_triton_reads_cache_slices_through_their_strides(triton_device):
    """The dynamic step's keys are a prefix of the preallocated cache (B, H, capacity, D); the cross-attention's
    stacked queries and the context's heads are transposed views. No copy is needed for the result."""
    generator = torch.Generator().manual_seed(2)
    cache = torch.randn(2, 3, 40, 16, 2, generator=generator).to(triton_device)
    k, v = cache[:, :, :23, :, 0], cache[:, :, :23, :, 1]  # a prefix, and every second element along D's neighbour
    q = torch.randn(2, 5, 3, 16, generator=generator).to(triton_device).transpose(1, 2)  # (B, H, M, D) view
    mask = torch.rand(2, 23, generator=generator).to(triton_device) < 0.8
    out = kernel.decode_attention_forward(q, k, v, mask, splits=2, tiling=TILING)
    truth = kernel.decode_attention_ref(q.double(), k.double(), v.double(), mask)
    assert_close(out, truth, what="strided")


def test_triton_refuses_what_it_cannot_do(triton_device):
    q, k, v, mask = on(triton_device, torch.float32, *make_inputs(2, 2, 1, 10, 16, "padding"))
    with pytest.raises(ValueError, match="no backward"):
        kernel.decode_attention_forward(q.requires_grad_(), k, v, mask)
    with pytest.raises(ValueError, match="no backward"):
        decode_attention_triton(q, k, v, mask)
    q = q.detach()
    with pytest.raises(ValueError, match="shapes disagree"):
        kernel.decode_attention_forward(q, k[:, :1], v, mask)
    with pytest.raises(ValueError, match="key_padding_mask must be bool"):
        kernel.decode_attention_forward(q, k, v, mask.int())
    with pytest.raises(ValueError, match="one dtype"):
        kernel.decode_attention_forward(q, k.half(), v, mask)
    with torch.no_grad():  # the same inputs are fine for inference
        kernel.decode_attention_forward(q.requires_grad_(), k, v, mask)


def test_triton_op_passes_opcheck(triton_device):
    q, k, v, mask = on(triton_device, torch.float32, *make_inputs(2, 2, 3, 37, 16, "padding"))
    torch.library.opcheck(decode_attention_triton_op, (q, k, v, mask))
    torch.library.opcheck(decode_attention_triton_op, (q, k, v, None))


def test_registry_keeps_sdpa_unless_the_kernel_is_named(monkeypatch):
    """``auto`` passes the kernel over until a GPU timing adopts it; naming it selects it."""
    let_backend_run_on(monkeypatch, decode_attention_op, ("cpu", "cuda"))
    cpu = torch.device("cpu")
    with ops.impl_scope("auto"):
        assert decode_attention_op.select(cpu, torch.float32) == "torch"
    with ops.impl_scope("auto,decode_attention=triton"):
        assert decode_attention_op.select(cpu, torch.float32) == "triton"


@pytest.fixture(scope="module")
def caption():
    torch.manual_seed(0)
    return build_model("caption", tiny_config()).eval()


@pytest.mark.parametrize("strategy,decode_step", [("beam", "dynamic"), ("nucleus", "static")])
def test_generation_through_the_kernel_writes_the_sdpa_tokens(triton_device, caption, monkeypatch, strategy,
                                                              decode_step):
    """Beam search and sampled captions of the tiny model, fp32: the kernel in every decoding step (self-attention of
    the one-token steps, cross-attention of all; the static step's broadcast mask) writes the tokens SDPA writes."""
    let_backend_run_on(monkeypatch, decode_attention_op, ("cpu", "cuda"))
    calls = []
    monkeypatch.setattr(decode_attention_op.impls["triton"], "fn",
                        lambda *args: calls.append(args[0].shape) or decode_attention_triton(*args))
    model = caption.to(triton_device)
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(8)).to(triton_device)
    prompt = torch.tensor([[30522, 1037, 3861, 1997]] * 3, device=triton_device)
    config = GenerationConfig(strategy=strategy, max_length=12, min_length=5, num_beams=3, decode_step=decode_step,
                              num_return_sequences=2 if strategy == "nucleus" else 1)
    outputs = {}
    for impl in ("auto", "auto,decode_attention=triton"):
        with ops.impl_scope(impl):
            outputs[impl] = model.generate(images, prompt, config, torch.Generator().manual_seed(9))
    assert torch.equal(outputs["auto"], outputs["auto,decode_attention=triton"])
    layers = len(model.text_decoder.bert.encoder.layer)
    # the prompt's step: cross-attention only (its self-attention is causal); each later step: both
    steps = outputs["auto"].shape[1] - prompt.shape[1]
    assert len(calls) >= layers * (1 + 2 * (steps - 1)), (len(calls), steps)


# -- GPU: bf16, BLIP's shapes --------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_bf16_against_the_truth_on_gpu(shape):
    *sizes, splits = shape
    q, k, v, mask = make_inputs(*sizes)
    low = on("cuda", torch.bfloat16, q, k, v, mask)
    out = kernel.decode_attention_forward(*low, splits=splits, tiling=TILING)
    assert_close(out, kernel.decode_attention_ref(q, k, v, mask), kernel.decode_attention_ref(*low),
                 torch.bfloat16, str(shape))
