"""ITM's and LM's text passes run layer by layer together (``joint_text_passes``): what separate passes compute.

The joint passes send the rows of every pass through the shared embeddings, cross-attention and feed-forward at
once and let each pass's rows self-attend apart, so hidden states, losses and gradients are those of separate
passes up to the summation order of the weight gradients (and of GEMMs over more rows). Dropout is off: the joint
passes draw their masks in another order. Tolerance, ``max|joint - separate| / max|separate|`` per output, loss and
parameter gradient: 1e-10 in fp64, 1e-5 in fp32 (measured on a 2-core x86 CPU, torch 2.13: 1e-15 and 5e-7).
"""

import copy

import pytest
import torch
from packing_checks import CAPTION_LENGTHS, assert_grads_match, captions, no_dropout_config
from tensor_checks import rel_err

from blip_fast import ops
from blip_fast.config import tiny_config
from blip_fast.models import build_model
from blip_fast.models.fast_passes import BlockContext, TextPass, joint_text_passes
from blip_fast.models.med import TextTransformer
from blip_fast.models.packing import PackedText
from blip_fast.tolerances import RTOL

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def pretraining_step(model, joint: bool, images, ids, mask, packing):
    twin = copy.deepcopy(model)
    twin.joint_grounded_passes = joint
    losses = twin(images, ids, mask, 0.4, torch.Generator().manual_seed(2), packing=packing)
    sum(losses.values()).backward()
    return ({k: v.detach() for k, v in losses.items()},
            {n: p.grad for n, p in twin.named_parameters() if p.requires_grad})


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_pretraining_joint_passes_equal_separate_passes(dtype, packed):
    """BlipPretrain's three losses and every gradient, with ITM's hard negatives and the decoder's causal rows."""
    model = build_model("pretrain", no_dropout_config()).to(dtype)
    images = torch.randn(len(CAPTION_LENGTHS), 3, 64, 64, dtype=dtype)
    ids, mask = captions(CAPTION_LENGTHS)
    packing = PackedText.from_mask(mask, multiple=8) if packed else None
    # the native sampler takes fp32/fp16/bf16 similarities; fp64 runs the reference
    with ops.impl_scope("reference" if dtype == torch.float64 else "auto"):
        joint = pretraining_step(model, True, images, ids, mask, packing)
        separate = pretraining_step(model, False, images, ids, mask, packing)
    for name, want in separate[0].items():
        assert torch.isfinite(want) and rel_err(joint[0][name], want) <= RTOL[dtype], name
    assert_grads_match(joint[1], separate[1], RTOL[dtype])


def grounded_passes(packed: bool):
    """An encoder pass (bidirectional; rows reading the images as ITM's do, one image stacked for two rows and rows
    picking theirs) and a decoder pass (causal, each row its own image) over one model's shared weights."""
    model = build_model("pretrain", no_dropout_config()).to(torch.float64)
    ids, mask = captions(CAPTION_LENGTHS, seed=3)
    batch = ids.shape[0]
    image_kv = model.image_keys_values(torch.randn(batch, 17, 64, dtype=torch.float64))
    picked = torch.tensor([3, 0, 5, 1, 1, 2])
    enc_ids, enc_mask = torch.cat([ids, ids[picked], ids]), torch.cat([mask, mask[picked], mask])
    enc_packing = dec_packing = None
    if packed:
        dense = PackedText.dense(batch, ids.shape[1], "cpu")
        enc_packing = PackedText.concat([PackedText.from_mask(mask), dense, PackedText.from_mask(mask, multiple=4)])
        dec_packing = PackedText.from_mask(mask, multiple=8)
    encoder = TextPass(model.text_encoder, enc_ids, enc_mask, False, enc_packing)
    decoder = TextPass(model.text_decoder.bert, ids, mask, True, dec_packing)
    enc_contexts = [BlockContext(((k, v, 2, None), (k, v, 1, picked))) for k, v in image_kv]
    return encoder, decoder, enc_contexts, image_kv


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_joint_text_passes_equal_each_pass_alone(packed):
    """Hidden states of every row and the gradients of every weight and of the image keys/values (fp64)."""
    encoder, decoder, enc_contexts, image_kv = grounded_passes(packed)
    readouts = [torch.randn(p.input_ids.shape[0] if p.packing is None else p.packing.tokens,
                            *(() if p.packing is not None else (p.input_ids.shape[1],)), 64, dtype=torch.float64)
                for p in (encoder, decoder)]
    params = {f"encoder.{n}": p for n, p in encoder.transformer.named_parameters()}
    params |= {f"decoder.{n}": p for n, p in decoder.transformer.encoder.named_parameters()}
    image_kv_list = [t for pair in image_kv for t in pair]

    def outputs_and_grads(states):
        total = sum((s * r).sum() for s, r in zip(states, readouts, strict=True))
        grads = torch.autograd.grad(total, [*params.values(), *image_kv_list], retain_graph=True)
        return states, dict(zip(params, grads[:len(params)], strict=True)), grads[len(params):]

    joint_contexts = [BlockContext(context.segments + ((k, v, 1, None),))
                      for context, (k, v) in zip(enc_contexts, image_kv, strict=True)]
    joint = outputs_and_grads(joint_text_passes([encoder, decoder], joint_contexts))
    separate = outputs_and_grads([
        encoder.transformer(encoder.input_ids, encoder.attention_mask, context_kv=enc_contexts,
                            packing=encoder.packing),
        decoder.transformer(decoder.input_ids, decoder.attention_mask, causal=True, context_kv=image_kv,
                            packing=decoder.packing)])
    for got, want in zip(joint[0], separate[0], strict=True):
        assert got.shape == want.shape and rel_err(got, want) <= RTOL[torch.float64]
    assert_grads_match(joint[1], separate[1], RTOL[torch.float64])
    for got, want in zip(joint[2], separate[2], strict=True):
        assert rel_err(got, want) <= RTOL[torch.float64]


def test_joint_text_passes_refuse_what_they_cannot_join():
    encoder, decoder, enc_contexts, image_kv = grounded_passes(packed=False)
    contexts = [BlockContext(context.segments + ((k, v, 1, None),))
                for context, (k, v) in zip(enc_contexts, image_kv, strict=True)]
    stranger = TextTransformer(tiny_config().text, encoder_width=64).to(torch.float64)
    with pytest.raises(ValueError, match="share all but their self-attention"):
        joint_text_passes([encoder, decoder._replace(transformer=stranger)], contexts)
    with pytest.raises(ValueError, match="one length"):
        joint_text_passes([encoder, decoder._replace(input_ids=decoder.input_ids[:, :-1],
                                                     attention_mask=decoder.attention_mask[:, :-1])], contexts)
    with pytest.raises(ValueError, match="all packed or all padded"):
        joint_text_passes([encoder, decoder._replace(packing=PackedText.from_mask(decoder.attention_mask))], contexts)
    with pytest.raises(ValueError, match="1 entries for 2 layers"):
        joint_text_passes([encoder, decoder], contexts[:1])
