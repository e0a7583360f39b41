"""Cross-attention keys/values computed once per step: same losses and gradients as recomputing them.

``BlipPretrain.forward`` projects the image tokens to each text layer's cross-attention keys and
values once and the 3B ITM rows read theirs from them; the LM decoder (which shares the encoder's
cross-attention) reads them as they are. ``losses_recomputing_kv`` below is the forward as it was
before: every text pass projects its own (repeated) image tokens, with the all-ones image mask.

The ITM and LM passes run one after the other here (``joint_grounded_passes = False``), as in the recomputing
forward, so that dropout draws its masks in the same rows; tests/models/test_joint_text_passes.py shows the joint
passes equal to these. The ITM rows come in the order BlipPretrain uses (positives, negative texts, negative images);
the positive and negative-text rows of an image share its keys/values there, stacked along the
sequence (``BlockContext``), and each row has its own copy here. Both run on copies of one model
with the same dropout seed and hard-negative generator, attention dropout off (the stacked rows
draw the cross-attention's dropout in another layout), so they differ only in the order in which
gradients of the key/value projections are summed. Tolerance,
``max|reuse - recompute| / max|recompute|`` per loss and per parameter gradient: 1e-10 in fp64
(measured: 1e-15), 1e-5 in fp32 (measured: 6e-7). Key biases, whose gradient vanishes in exact
arithmetic, are measured against their key weight's gradient instead.
"""

import copy

import pytest
import torch
from tensor_checks import rel_err

from blip_fast import ops
from blip_fast.config import tiny_config
from blip_fast.models import BlipPretrain, GenerationConfig, build_model
from blip_fast.models.med import KVCache
from blip_fast.tolerances import RTOL

CAPTION_LENGTHS = [7, 11, 4, 13, 9, 6]  # tokens per caption, padded to the longest (13); 6 divides the queue


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def captions(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ([CLS] first, [SEP] last, padded with 0) and their mask, one row per length."""
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(1000, 5000, (length,))
        ids[row, 0], ids[row, length - 1] = 101, 102
    return ids, (ids != 0).long()


def losses_recomputing_kv(model: BlipPretrain, images, input_ids, attention_mask, alpha, generator):
    """``BlipPretrain.forward`` before the reuse: each text pass projects the image tokens itself."""
    with torch.no_grad():
        model.temp.clamp_(0.001, 0.5)
    image_embeds = model.image_embeds(images)
    image_feat = model.image_features(image_embeds)
    text_feat = model.text_features(input_ids, attention_mask)
    with torch.no_grad():
        model.momentum_update()
        image_feat_m = torch.nn.functional.normalize(model.vision_proj_m(model.visual_encoder_m(images)[:, 0]), dim=-1)
        text_m = model.text_encoder_m(input_ids, attention_mask)
        text_feat_m = torch.nn.functional.normalize(model.text_proj_m(text_m[:, 0]), dim=-1)
    loss_itc, sim_i2t, sim_t2i = ops.itc_loss(image_feat, text_feat, image_feat_m, text_feat_m,
                                              model.image_queue, model.text_queue, model.temp, alpha)
    model.enqueue(image_feat_m, text_feat_m)

    batch = images.shape[0]
    enc_ids = model.with_enc(input_ids)
    with torch.no_grad():
        neg_image_for_text = ops.sample_hard_negatives(sim_t2i, generator=generator)
        neg_text_for_image = ops.sample_hard_negatives(sim_i2t, generator=generator)
    ids_all = torch.cat([enc_ids, enc_ids[neg_text_for_image], enc_ids], dim=0)
    mask_all = torch.cat([attention_mask, attention_mask[neg_text_for_image], attention_mask], dim=0)
    images_all = torch.cat([image_embeds, image_embeds, image_embeds[neg_image_for_text]], dim=0)
    images_mask = torch.ones(images_all.shape[:-1], dtype=torch.long)
    fused = model.text_encoder(ids_all, mask_all, images_all, images_mask)
    loss_itm = ops.itm_loss(model.itm_head(fused[:, 0, :]), batch)

    decoder_ids = input_ids.clone()
    decoder_ids[:, 0] = model.config.text.bos_token_id
    targets = decoder_ids.masked_fill(decoder_ids == 0, ops.IGNORE_INDEX)
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
    loss_lm = model.text_decoder.loss(decoder_ids, attention_mask, image_embeds, image_mask, targets,
                                      model.config.label_smoothing)
    return {"itc": loss_itc, "itm": loss_itm, "lm": loss_lm}


def run_step(model, step, images, input_ids, attention_mask):
    """Losses and every parameter's gradient after one backward of their sum (dropout seeded)."""
    torch.manual_seed(1)
    losses = step(model, images, input_ids, attention_mask, 0.4, torch.Generator().manual_seed(2))
    sum(losses.values()).backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach() for k, v in losses.items()}, grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_pretraining_reuse_equals_recomputation(dtype):
    config = tiny_config()
    config.text.attention_dropout = 0.0
    model = build_model("pretrain", config).to(dtype)
    assert model.training and config.text.hidden_dropout > 0  # hidden dropout still draws, in the same rows
    images = torch.randn(len(CAPTION_LENGTHS), 3, 64, 64, dtype=dtype)
    input_ids, attention_mask = captions(CAPTION_LENGTHS)
    # the native sampler takes fp32/fp16/bf16 similarities; fp64 runs the reference
    with ops.impl_scope("reference" if dtype == torch.float64 else "auto"):
        separate = copy.deepcopy(model)
        separate.joint_grounded_passes = False
        reused = run_step(separate, BlipPretrain.forward, images, input_ids, attention_mask)
        recomputed = run_step(copy.deepcopy(model), losses_recomputing_kv, images, input_ids, attention_mask)

    rtol = RTOL[dtype]
    for name, expected in recomputed[0].items():
        assert torch.isfinite(expected) and rel_err(reused[0][name], expected) <= rtol, name
    grads, expected_grads = reused[1], recomputed[1]
    assert grads.keys() == expected_grads.keys()
    missing = [name for name, g in expected_grads.items() if g is None]
    assert missing == [], f"parameters without gradient: {missing}"
    errors = {}
    for name, expected in expected_grads.items():
        if name.endswith("key.bias"):
            # softmax ignores a shift shared by every key, so this gradient is zero in exact arithmetic
            # and both sides hold rounding noise: measure it on the scale of the key weight's gradient
            scale = expected_grads[name[: -len("bias")] + "weight"].abs().max()
            assert expected.abs().max() <= rtol * scale, f"{name}: gradient should vanish"
            errors[name] = ((grads[name] - expected).abs().max() / scale).item()
        else:
            errors[name] = rel_err(grads[name], expected)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= rtol, f"{len(errors)} gradients; worst {worst}: rel err {errors[worst]:.3g} > {rtol}"
    cross_kv = "text_encoder.encoder.layer.0.crossattention.self.key.weight"
    assert cross_kv in errors, "the shared key projection must get a gradient"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_stacked_context_projection_equals_each_layers_own(dtype):
    """context_keys_values projects for every layer in one GEMM: the keys, values and the gradients of the context
    and of every key/value weight and bias equal each layer's own projection (fp64 1e-12, fp32 1e-5)."""
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    model = build_model("pretrain", tiny_config()).to(dtype)
    encoder = model.text_encoder
    context = torch.randn(3, 17, 64, dtype=dtype, requires_grad=True)
    stacked = encoder.context_keys_values(context)
    each = [(p.heads(p.key(context)), p.heads(p.value(context)))
            for p in (layer.crossattention.self for layer in encoder.encoder.layer)]
    assert len(stacked) == len(each) == 2
    weights = [torch.randn_like(t) for pair in each for t in pair]
    params = [context] + [p for layer in encoder.encoder.layer
                          for p in (*layer.crossattention.self.key.parameters(),
                                    *layer.crossattention.self.value.parameters())]

    def grads(pairs):
        total = sum((t * w).sum() for t, w in zip([t for pair in pairs for t in pair], weights, strict=True))
        return torch.autograd.grad(total, params)

    for (k, v), (k_want, v_want) in zip(stacked, each, strict=True):
        assert k.shape == k_want.shape == (3, 4, 17, 16)
        assert rel_err(k, k_want) <= tol and rel_err(v, v_want) <= tol
    for got, want in zip(grads(stacked), grads(each), strict=True):
        assert rel_err(got, want) <= tol


def test_context_kv_equals_hidden_states_and_rejects_both():
    model = build_model("pretrain", tiny_config()).eval()
    image_embeds = model.image_embeds(torch.randn(3, 3, 64, 64))
    ids, mask = captions([5, 8, 3])
    kv = model.image_keys_values(image_embeds)
    assert len(kv) == 2 and kv[0][0].shape == (3, 4, 17, 16)
    from_states = model.text_encoder(ids, mask, image_embeds)
    assert torch.allclose(model.text_encoder(ids, mask, context_kv=kv), from_states, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="not both"):
        model.text_encoder(ids, mask, image_embeds, context_kv=kv)
    with pytest.raises(ValueError, match="no cross-attention"):
        model.text_encoder_m.__class__(model.config.text, None)(ids, mask, context_kv=kv)


def test_generation_with_a_cache_seeded_from_context_kv():
    """A cache given the context's keys/values up front decodes as one that computes them itself."""
    model = build_model("caption", tiny_config()).eval()
    decoder = model.text_decoder
    context = model.image_embeds(torch.randn(2, 3, 64, 64))
    ids = torch.randint(1000, 2000, (2, 5))
    ids[:, 0] = 30522
    full = decoder.logits(decoder.hidden_states(ids, None, context))
    cache = KVCache.empty(2, capacity=5)
    kv = decoder.bert.context_keys_values(context)
    steps = [decoder.logits(decoder.hidden_states(ids[:, :2], None, None, cache=cache, context_kv=kv))]
    for t in range(2, 5):
        steps.append(decoder.logits(decoder.hidden_states(ids[:, t:t + 1], None, context, cache=cache)))
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-5
    out = model.generate(torch.randn(2, 3, 64, 64), ids[:, :1], GenerationConfig(max_length=6, min_length=6))
    assert out.shape == (2, 6)


@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_block_context_equals_attention_to_copied_rows(impl):
    """A BlockContext attends as the same attention with every row's keys/values copied out (fp64 1e-12 in
    outputs and gradients of queries, keys and values; fp32 for the auto backend, 1e-5)."""
    from blip_fast.models.fast_passes import BlockContext

    dtype = torch.float64 if impl == "reference" else torch.float32
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    gen = torch.Generator().manual_seed(0)
    rows, heads, length, context, dim = 5, 3, 7, 11, 8

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()

    q = rand(3 * rows, heads, length, dim)
    k, v, k2, v2 = (rand(rows, heads, context, dim) for _ in range(4))
    picked = torch.tensor([4, 0, 0, 2, 1])  # the last segment's rows, picked from k2/v2 (as ITM's negative images)
    with ops.impl_scope(impl):
        blocked = BlockContext(((k, v, 2, None), (k2, v2, 1, picked))).attend(q, 0.0)
        copied = ops.attention(q, torch.cat([k, k, k2[picked]]), torch.cat([v, v, v2[picked]]), None, False, 0.0)
    weights = torch.randn(blocked.shape, generator=gen, dtype=dtype)
    grads = torch.autograd.grad((blocked * weights).sum(), (q, k, v, k2, v2))
    expected = torch.autograd.grad((copied * weights).sum(), (q, k, v, k2, v2))
    assert rel_err(blocked, copied) <= tol
    for got, want, name in zip(grads, expected, ("q", "k", "v", "k2", "v2"), strict=True):
        assert rel_err(got, want) <= tol, name
    with pytest.raises(ValueError, match="cover 10 rows"):
        BlockContext(((k, v, 2, None),)).attend(q, 0.0)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_stacked_self_attention_projection_equals_three(packed):
    """Self-attention's query/key/value projections in one GEMM equal three separate ones: outputs and the gradients
    of the input and of every weight and bias (fp64 1e-12), padded or packed."""
    from blip_fast.models.fast_passes import queries_keys_values
    from blip_fast.models.packing import PackedText

    attention = build_model("pretrain", tiny_config()).double().text_encoder.encoder.layer[0].attention
    projections = attention.self
    ids, mask = captions([5, 8, 3])
    packing = PackedText.from_mask(mask, multiple=8) if packed else None
    x = torch.randn(packing.tokens if packed else 3, *(() if packed else (8,)), 64, dtype=torch.float64,
                    requires_grad=True)
    stacked = queries_keys_values(attention, x, packing)
    each = [projections.heads(linear(x) if packing is None else packing.unpack(linear(x)))
            for linear in (projections.query, projections.key, projections.value)]
    weights = [torch.randn_like(t) * mask[:, None, :, None] for t in each]  # padding positions are not read
    params = [x, *projections.parameters()]

    def grads(outputs):
        return torch.autograd.grad(sum((t * w).sum() for t, w in zip(outputs, weights, strict=True)), params)

    for got, want in zip(stacked, each, strict=True):
        assert got.shape == want.shape == (3, 4, 8, 16) and rel_err(got, want) <= 1e-12
    for got, want in zip(grads(stacked), grads(each), strict=True):
        assert rel_err(got, want) <= 1e-12
