"""The streaming ITC kernels (Triton) against the reference, forward and gradients.

Shapes sweep one row, odd batches, a batch past one row block, embedding widths that are not a power of two, an
empty queue, queues shorter and longer than one tile, and column splits from one to more than there are tiles
(empty splits); positives on the diagonal and by image ids (retrieval), which can sit anywhere in the queue;
alpha 0, 0.4 and 1; temperatures 0.07 and 0.001 (logits up to 1,000).

Tolerances, all against the reference evaluated in fp64 on the same inputs:

* fp32: relative error (max |diff| / max |ref|) <= 1e-5 for the loss, the in-batch similarities and the gradients
  of both features and the temperature;
* fp16: flash-attention's rule, as ``blip-fast parity``: the kernel's error is at most twice that of the reference
  evaluated in fp16 itself, plus ``2e-3 * max |ref|`` for summation order;
* bf16: the same rule on the GPU only (the interpreter cannot hold bf16).
"""

import pytest
import torch
import torch.nn.functional as F
from backend_helpers import cuda_peak_bytes, let_backend_run_on
from tensor_checks import assert_close_to_truth as assert_close
from tensor_checks import rel_err
from torch.utils.flop_counter import FlopCounterMode

from blip_fast import ops
from blip_fast.config import tiny_config
from blip_fast.kernels import contrastive as kernel
from blip_fast.models import BlipPretrain
from blip_fast.ops.losses import (
    itc_loss_op,
    itc_loss_ref,
    itc_loss_triton,
    itc_loss_triton_op,
)
from blip_fast.shapes import EMBED_DIM, PRETRAIN_BATCH, QUEUE_SIZE

# (batch, queue, dim, splits): None = the launcher's choice
SHAPES = [(1, 20, 16, None), (7, 97, 16, 3), (5, 0, 24, 1), (33, 150, 40, 2), (4, 200, 16, 9), (16, 40, 32, 64)]


def make_inputs(batch, queue, dim, ids=False, dtype=torch.float64, device="cpu", temp=0.07, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def feat(*shape, along=-1):
        return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=along)

    features = [feat(batch, dim) for _ in range(4)] + [feat(dim, queue, along=0), feat(dim, queue, along=0)]
    # the momentum twins close to the online features, as in training
    features[2] = F.normalize(features[0] + 0.3 * features[2], dim=-1)
    features[3] = F.normalize(features[1] + 0.3 * features[3], dim=-1)
    idx = idx_queue = None
    if ids:  # two captions per image in the batch; the queue holds some of the batch's images
        idx = torch.randint(0, max(1, batch // 2), (batch,), generator=generator)
        idx_queue = torch.randint(0, batch + 3, (queue,), generator=generator)
        idx, idx_queue = idx.to(device), idx_queue.to(device)
    floats = [x.to(device, dtype) for x in features]
    return floats, torch.tensor(temp, dtype=dtype, device=device), idx, idx_queue


def reference(features, temp, alpha, idx, idx_queue, cotangent=None):
    """Loss, in-batch similarities and gradients of (image_feat, text_feat, temp) in the inputs' dtype."""
    leaves = [features[0].clone().requires_grad_(), features[1].clone().requires_grad_()]
    temp = temp.clone().requires_grad_()
    loss, sim_i2t, sim_t2i = itc_loss_ref(*leaves, *features[2:], temp, alpha, idx, idx_queue)
    grads = torch.autograd.grad(loss, leaves + [temp], cotangent)
    return loss.detach(), sim_i2t, sim_t2i, list(grads)


def check(device, dtype, shape, ids, alpha, temp=0.07):
    batch, queue, dim, splits = shape
    features, t, idx, idx_queue = make_inputs(batch, queue, dim, ids, torch.float64, device, temp)
    truth = reference(features, t, alpha, idx, idx_queue)
    low = [x.to(dtype) for x in features]
    low_ref = reference(low, t.float(), alpha, idx, idx_queue)
    directions = [(low[0], low[2], low[3], low[5], idx, idx, idx_queue),
                  (low[1], low[3], low[2], low[4], idx, idx, idx_queue)]
    loss, sims, saved, dloss_dtemp = kernel.itc_forward(directions, t.float(), alpha, splits=splits)
    assert loss.dtype == torch.float32 and loss.shape == () and [s.shape for s in sims] == [(batch, batch)] * 2
    assert_close(loss, truth[0], low_ref[0], dtype, "loss")
    assert_close(sims[0], truth[1], low_ref[1], dtype, "sim_i2t")
    assert_close(sims[1], truth[2], low_ref[2], dtype, "sim_t2i")
    assert_close(dloss_dtemp, truth[3][2], low_ref[3][2], dtype, "grad temp")
    grads = kernel.itc_gradients(directions, t.float(), alpha, saved, splits=splits)
    for name, g, want, want_low in zip(("image_feat", "text_feat"), grads, truth[3], low_ref[3], strict=False):
        assert g.dtype == dtype and g.shape == (batch, dim)
        assert_close(g, want, want_low, dtype, f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ids,alpha", [(False, 0.4), (True, 0.4), (False, 0.0), (True, 1.0)])
def test_triton_loss_and_gradients_match_reference(triton_device, dtype, shape, ids, alpha):
    check(triton_device, dtype, shape, ids, alpha)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_at_the_smallest_temperature(triton_device, dtype):
    """temp clamped to 0.001: logits up to 1,000, the softmaxes one-hot; the online maxima keep exp finite."""
    check(triton_device, dtype, (7, 97, 16, 3), True, 0.4, temp=0.001)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_every_key_far_below(triton_device, dtype):
    """Every key opposite the queries at temp 0.001: each real logit is -1,000 while the tile's padding columns
    hold 0, whose exp(0 - max) overflows; they must not reach the sums or the gradients."""
    _, t, _, _ = make_inputs(1, 3, 16, False, torch.float64, triton_device, temp=0.001)
    v = F.normalize(torch.randn(1, 16, dtype=torch.float64), dim=-1)
    # online features v, every key (momentum features and queues) near -v: logits near -1 / temp, apart by a few
    keys = F.normalize(-v + 0.05 * torch.randn(4, 16, dtype=torch.float64), dim=-1).to(triton_device)
    v = v.to(triton_device)
    features = [v, v, keys[:1], keys[:1], keys[1:].t(), keys[1:].t()]
    truth = reference(features, t, 0.4, None, None)
    low = [x.to(dtype) for x in features]
    low_ref = reference(low, t.float(), 0.4, None, None)
    leaves = [low[0].clone().requires_grad_(), low[1].clone().requires_grad_()]
    loss = itc_loss_triton(*leaves, *low[2:], t.float(), 0.4)[0]
    grads = torch.autograd.grad(loss, leaves)
    assert_close(loss, truth[0], low_ref[0], dtype, "loss")
    for name, g, want, want_low in zip(("image_feat", "text_feat"), grads, truth[3], low_ref[3], strict=False):
        assert_close(g, want, want_low, dtype, f"grad {name}")


def test_triton_tiles_of_other_sizes(triton_device, monkeypatch):
    """Row blocks of 16 (a batch of 33 is three) and key tiles of 32 columns, one straddling batch keys and queue (the
    other tests run the default 32 x 32 blocks)."""
    monkeypatch.setitem(kernel.DEFAULT_TILINGS, torch.float32, kernel.Tiling(block_m=16, block_n=32))
    for ids in (False, True):
        check(triton_device, torch.float32, (33, 150, 40, 2), ids, 0.4)


def test_triton_positives_at_an_offset(triton_device):
    """Batch keys of every rank (B_k = 2B): rank 1's row i has its positive at key B + i; the reference's on the
    rows' own block equals the kernel given every rank's keys with the others' rows' keys as extra negatives."""
    batch, queue, dim = 5, 30, 16
    features, t, _, _ = make_inputs(2 * batch, queue, dim, False, torch.float32, triton_device)
    image, text, image_m, text_m, image_queue, text_queue = features
    rows = slice(batch, 2 * batch)
    # the reference's view of rank 1: its own momentum keys first, then rank 0's moved into the queue
    ref_queue_t = torch.cat([text_m[:batch].t(), text_queue], dim=1)
    ref_queue_i = torch.cat([image_m[:batch].t(), image_queue], dim=1)
    want, _, _ = itc_loss_ref(image[rows], text[rows], image_m[rows], text_m[rows], ref_queue_i, ref_queue_t, t, 0.4)
    directions = [(image[rows], image_m[rows], text_m, text_queue, None, None, None),
                  (text[rows], text_m[rows], image_m, image_queue, None, None, None)]
    loss = kernel.itc_forward(directions, t, 0.4, offset=batch, splits=3)[0]
    assert rel_err(loss, want) < 1e-5


def test_triton_op_autograd_equals_reference(triton_device):
    """The registered backend's entry: autograd through the custom ops, incoming gradient 3, fp32."""
    features, t, idx, idx_queue = make_inputs(7, 97, 16, True, torch.float32, triton_device)
    cotangent = torch.tensor(3.0, device=triton_device)
    want = reference(features, t, 0.4, idx, idx_queue, cotangent)
    leaves = [features[0].clone().requires_grad_(), features[1].clone().requires_grad_(), t.clone().requires_grad_()]
    loss, sim_i2t, sim_t2i = itc_loss_triton(leaves[0], leaves[1], *features[2:], leaves[2], 0.4, idx, idx_queue)
    assert not sim_i2t.requires_grad and not sim_t2i.requires_grad
    grads = torch.autograd.grad(loss, leaves, cotangent)
    assert rel_err(loss, want[0]) < 1e-5
    assert rel_err(sim_i2t, want[1]) < 1e-5 and rel_err(sim_t2i, want[2]) < 1e-5
    for name, g, e in zip(("image_feat", "text_feat", "temp"), grads, want[3], strict=True):
        assert g.shape == e.shape and rel_err(g, e) < 1e-5, name


def test_triton_autocast_casts_the_features_like_matmul(triton_device, monkeypatch):
    """Under autocast the four feature tensors reach the kernel in the autocast dtype, the queues as stored; fp32
    leaves get fp32 gradients, close to the reference's under the same autocast."""
    features, t, _, _ = make_inputs(7, 97, 16, False, torch.float32, triton_device)
    seen = []
    forward = kernel.itc_forward

    def spy(directions, *args, **kwargs):
        seen.append([x.dtype for x in directions[0][:4]])
        return forward(directions, *args, **kwargs)

    monkeypatch.setattr("blip_fast.ops.losses.itc_forward", spy)
    results = []
    for loss_fn in (itc_loss_ref, itc_loss_triton):
        leaves = [features[0].clone().requires_grad_(), features[1].clone().requires_grad_()]
        with torch.autocast(triton_device, dtype=torch.float16):
            loss = loss_fn(*leaves, *features[2:], t, 0.4)[0]
        grads = torch.autograd.grad(loss, leaves)
        assert all(g.dtype == torch.float32 for g in grads)
        results.append((loss, grads))
    assert seen == [[torch.float16, torch.float16, torch.float16, torch.float32]]
    (ref_loss, ref_grads), (loss, grads) = results
    assert rel_err(loss, ref_loss) < 2e-3
    for g, e in zip(grads, ref_grads, strict=True):
        assert rel_err(g, e) < 5e-3  # the reference rounds its similarities to fp16 as well, the kernel does not


def test_triton_no_gradients_without_autograd(triton_device):
    """Without a backward to follow, only the loss is made; the op asked for no gradients refuses a backward."""
    features, t, _, _ = make_inputs(7, 40, 16, False, torch.float32, triton_device)
    leaves = [features[0].clone().requires_grad_(), features[1].clone().requires_grad_()]
    with torch.no_grad():
        loss = itc_loss_triton(*leaves, *features[2:], t, 0.4)[0]
    assert loss.grad_fn is None and rel_err(loss, itc_loss_ref(*features, t, 0.4)[0]) < 1e-5
    loss, _, _, grad_image, _, _ = itc_loss_triton_op(*leaves, *features[2:], t, 0.4, None, None, False)
    assert grad_image.numel() == 0
    with pytest.raises(RuntimeError, match="compute_grads=False"):
        loss.backward()


def test_triton_gradients_survive_the_enqueue(triton_device):
    """The model writes this batch's momentum features into the queues between the loss and its backward (as the
    original): the gradients are those of the queues the loss saw."""
    features, t, _, _ = make_inputs(7, 40, 16, False, torch.float32, triton_device)
    want = reference(features, t, 0.4, None, None)[3]
    leaves = [features[0].clone().requires_grad_(), features[1].clone().requires_grad_()]
    queues = [features[4].clone(), features[5].clone()]
    loss = itc_loss_triton(*leaves, features[2], features[3], *queues, t, 0.4)[0]
    for queue in queues:
        queue[:, :7] = 0.5
    grads = torch.autograd.grad(loss, leaves)
    for g, e in zip(grads, want, strict=False):
        assert rel_err(g, e) < 1e-5


def test_triton_rejects_bad_inputs(triton_device):
    features, t, idx, idx_queue = make_inputs(7, 97, 16, True, torch.float32, triton_device)
    image, text, image_m, text_m, image_queue, text_queue = features
    cases = [
        ((image, text, image_m[:3], text_m, image_queue, text_queue, t), {}, "momentum twins"),
        ((image, text, image_m, text_m, image_queue[:8], text_queue, t), {}, "keys must be"),
        ((image, text, image_m, text_m, image_queue, text_queue, t.expand(2)), {}, "temp must hold one value"),
        ((image, text, image_m, text_m, image_queue.double(), text_queue, t), {}, "float32, float16 or bfloat16"),
        ((image, text, image_m, text_m, image_queue, text_queue, t), {"idx": idx}, "for all of rows"),
        ((image, text, image_m, text_m, image_queue, text_queue, t), {"idx": idx[:3], "idx_queue": idx_queue},
         "ids must be"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            itc_loss_triton(*args, 0.4, **kwargs)
    wide = torch.zeros(7, kernel.MAX_DIM + 1, device=triton_device)
    with pytest.raises(ValueError, match="D <= 1024"):
        itc_loss_triton(wide, wide, wide, wide, wide.t(), wide.t(), t, 0.4)


def test_triton_ops_pass_opcheck(triton_device):
    for ids in (False, True):
        features, t, idx, idx_queue = make_inputs(7, 40, 16, ids, torch.float32, triton_device)
        image, text = (x.clone().requires_grad_() for x in features[:2])
        temp = t.clone().requires_grad_()
        torch.library.opcheck(itc_loss_triton_op, (image, text, *features[2:], temp, 0.4, idx, idx_queue, True))
        torch.library.opcheck(itc_loss_triton_op, (image.detach(), text.detach(), *features[2:], t, 0.4, idx,
                                                   idx_queue, False))
    # a transposed queue view (the kernels read it through its strides) and non-contiguous features
    image_t = features[0].t().contiguous().t().requires_grad_()
    torch.library.opcheck(itc_loss_triton_op, (image_t, features[1], features[2], features[3],
                                               features[4].t().contiguous().t(), features[5], t, 0.4, None, None,
                                               True))


def test_triton_fullgraph_compile_matches_eager(triton_device):
    """The ops are opaque nodes of one compiled graph (projection, normalisation, loss); values and gradients equal
    eager."""
    torch._dynamo.reset()
    features, t, idx, idx_queue = make_inputs(7, 97, 16, True, torch.float32, triton_device)
    projection = torch.randn(16, 16, device=triton_device)

    def loss_of(image, text, temp):
        image, text = F.normalize(image @ projection, dim=-1), F.normalize(text @ projection, dim=-1)
        loss, sim_i2t, _ = itc_loss_triton(image, text, *features[2:], temp, 0.4, idx, idx_queue)
        return loss + 0.0 * sim_i2t.sum()

    compiled = torch.compile(loss_of, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (loss_of, compiled):
        leaves = [features[0].clone().requires_grad_(), features[1].clone().requires_grad_(),
                  t.clone().requires_grad_()]
        loss = fn(*leaves)
        results.append((loss, torch.autograd.grad(loss, leaves)))
    (eager, eager_grads), (out, grads) = results
    assert rel_err(out, eager) < 1e-6
    for g, e in zip(grads, eager_grads, strict=True):
        assert rel_err(g, e) < 1e-6
    torch._dynamo.reset()


def test_triton_flop_counter_sees_the_products(triton_device):
    """FlopCounterMode counts the kernels' products: 2 directions x 2 products of 2BND forward, 3 backward."""
    batch, queue, dim = 7, 40, 16
    features, t, _, _ = make_inputs(batch, queue, dim, False, torch.float32, triton_device)
    leaves = [features[0].clone().requires_grad_(), features[1].clone().requires_grad_()]
    with FlopCounterMode(display=False) as counter:
        itc_loss_triton(*leaves, *features[2:], t, 0.4)[0].backward()
    product = 2 * batch * (batch + queue) * dim
    assert counter.get_total_flops() == 2 * (2 + 3) * product


@pytest.fixture
def triton_itc_on_cpu(triton_device, monkeypatch):
    """Lets the registry pick the Triton ITC loss for CPU tensors (the interpreter) as it does on CUDA."""
    let_backend_run_on(monkeypatch, itc_loss_op, ("cpu", "cuda"))
    return triton_device


def test_triton_pretraining_trains_the_same(triton_itc_on_cpu):
    """BLIP's tiny pretraining model, three SGD steps from one seed with the ITC loss on each backend: the same
    losses at every step and the same weights after, fp32 (hard negatives drawn from the kernel's similarities).
    SGD, not AdamW: the attention key biases have an exactly zero gradient (softmax ignores a shift), and AdamW
    turns the rounding noise that stands in for it into steps of the learning rate, different in any two
    summation orders."""
    device = triton_itc_on_cpu
    config = tiny_config(image_size=32)
    config.queue_size = 24
    images = torch.randn(4, 3, config.vision.image_size, config.vision.image_size, device=device)
    input_ids = torch.randint(1, 99, (4, 9), device=device)
    input_ids[:, 0] = config.text.bos_token_id
    mask = torch.ones_like(input_ids)
    mask[1, 6:] = 0
    curves = {}
    for impl in ("reference", "auto,itc_loss=triton"):
        torch.manual_seed(0)
        model = BlipPretrain(config).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        with ops.impl_scope(impl):
            assert itc_loss_op.select(torch.device(device)) == ("reference" if impl == "reference" else "triton")
            for step in range(3):
                out = model(images, input_ids, mask, alpha=0.4, generator=torch.Generator().manual_seed(step))
                optimizer.zero_grad()
                sum(out.values()).backward()
                optimizer.step()
                losses.append([out[k].item() for k in ("itc", "itm", "lm")])
        curves[impl] = (losses, torch.cat([p.detach().flatten() for p in model.parameters()]),
                        model.image_queue.clone())
    (ref_losses, ref_params, ref_queue), (losses, params, queue) = curves.values()
    for step, (got, want) in enumerate(zip(losses, ref_losses, strict=True)):
        for a, e in zip(got, want, strict=True):
            assert abs(a - e) <= 1e-5 * abs(e), f"step {step}: {got} vs {want}"
    assert rel_err(params, ref_params) < 1e-5
    assert rel_err(queue, ref_queue) < 1e-5


# -- GPU: bf16, BLIP's shapes --------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("ids", [False, True])
def test_triton_bf16_against_the_truth_on_gpu(ids):
    check("cuda", torch.bfloat16, (PRETRAIN_BATCH, 4000, EMBED_DIM, None), ids, 0.4)


@pytest.mark.gpu
def test_triton_holds_less_memory_than_the_reference_on_gpu():
    """At BLIP's batch and queue the reference holds four (B, B + Q) fp32 matrices per direction and their
    softmaxes; the kernels hold per-row statistics."""
    features, t, _, _ = make_inputs(PRETRAIN_BATCH, QUEUE_SIZE, EMBED_DIM, False, torch.float32, "cuda")
    peaks = {}
    for name, loss_fn in (("reference", itc_loss_ref), ("triton", itc_loss_triton)):
        leaves = [features[0].clone().requires_grad_(), features[1].clone().requires_grad_()]
        peaks[name] = cuda_peak_bytes(
            lambda fn=loss_fn, leaves=leaves: fn(*leaves, *features[2:], t, 0.4)[0].backward())
    assert peaks["triton"] < peaks["reference"] / 5, peaks
