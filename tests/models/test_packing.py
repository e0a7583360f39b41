"""Packed captions (blip_fast.models.packing): the same states, losses and gradients as padded ones.

The packed path computes each real token's row exactly as the padded path does, so the comparisons
are tight: ``max|packed - padded| / max|padded|`` at most 1e-12 in fp64 (measured ~4e-16) and 1e-5
in fp32 (the GEMMs see other row counts). Dropout is off where the two are compared, since its masks
are drawn in another layout. Key biases, whose gradient vanishes in exact arithmetic, are measured
against their key weight's gradient (as in test_context_kv.py).
"""

import copy

import pytest
import torch
from packing_checks import CAPTION_LENGTHS, assert_grads_match, captions, no_dropout_config
from tensor_checks import rel_err

from blip_fast import ops
from blip_fast.config import tiny_config
from blip_fast.models import BlipPretrain, build_model
from blip_fast.models.fast_passes import BlockContext
from blip_fast.models.packing import PackedText
from blip_fast.tolerances import RTOL

# tighter in fp64 than the shared table: packing moves rows, it does not change their arithmetic (module docstring)
PACKED_RTOL = {**RTOL, torch.float64: 1e-12}

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# ---------------------------------------------------------------------------------------------- the layout


@pytest.mark.parametrize("multiple", [1, 8, 64])
def test_packing_layout(multiple):
    ids, mask = captions(CAPTION_LENGTHS)
    packing = PackedText.from_mask(mask, multiple)
    real = sum(CAPTION_LENGTHS)
    assert packing.tokens % multiple == 0 and real <= packing.tokens < real + multiple
    assert (packing.batch, packing.length) == mask.shape
    assert torch.equal(packing.real, torch.arange(packing.tokens) < real) and torch.equal(packing.valid, mask.bool())
    packed_ids = packing.pack(ids)
    assert torch.equal(packed_ids[:real], ids[mask.bool()])  # captions in order, padding left out
    assert torch.equal(packing.positions[:real], torch.cat([torch.arange(n) for n in CAPTION_LENGTHS]))
    assert torch.equal(packing.first_rows(packed_ids), ids[:, 0])
    rows = packing.index // packing.length  # the caption of each packed token
    assert torch.equal(rows[:real], torch.repeat_interleave(torch.arange(6), torch.tensor(CAPTION_LENGTHS)))
    # filler rows copy the last token of captions
    last = mask.sum(1) - 1
    assert all(int(packing.positions[j]) == int(last[int(rows[j])]) for j in range(real, packing.tokens))
    # unpack puts every real token back; padding positions hold some real row
    states = torch.randn(packing.tokens, 5)
    unpacked = packing.unpack(states)
    assert unpacked.shape == (6, 13, 5)
    assert torch.equal(packing.pack(unpacked)[:real], states[:real])
    assert int(packing.inverse.max()) < real
    # next-token targets: ignored after each caption's last token, so on every filler row
    targets = ids.masked_fill(mask == 0, ops.IGNORE_INDEX)
    next_targets = packing.next_token_targets(targets)
    assert int((next_targets != ops.IGNORE_INDEX).sum()) == real - 6
    assert torch.equal(next_targets[: CAPTION_LENGTHS[0] - 1], ids[0, 1:CAPTION_LENGTHS[0]])
    assert bool((next_targets[real - 1:] == ops.IGNORE_INDEX).all())


def test_dense_and_concat_equal_the_packing_of_the_whole():
    _, mask = captions(CAPTION_LENGTHS)
    part = PackedText.from_mask(mask)
    dense = PackedText.dense(2, 13, "cpu")
    for got, want in zip(dense, PackedText.from_mask(torch.ones(2, 13)), strict=True):
        assert torch.equal(got, want)
    whole_mask = torch.cat([mask, torch.ones(2, 13, dtype=torch.long), mask]).bool()
    whole = PackedText.from_mask(whole_mask)
    joined = PackedText.concat([part, dense, part])
    for name in ("index", "first", "positions", "real", "valid"):
        assert torch.equal(getattr(joined, name), getattr(whole, name)), name
    # padding positions may point at any real row
    assert torch.equal(joined.inverse[whole_mask], whole.inverse[whole_mask])
    with pytest.raises(ValueError, match="lengths"):
        PackedText.concat([part, PackedText.dense(2, 5, "cpu")])


def test_pack_and_unpack_gradients_equal_autograds_scatter():
    """The gathered gradients of pack/unpack equal index_select's scatter-add wherever the upstream gradient is
    zero on the rows nothing reads (padding positions after unpack, filler rows after pack), as in the model."""
    _, mask = captions(CAPTION_LENGTHS)
    packing = PackedText.from_mask(mask, multiple=16)
    packed = torch.randn(packing.tokens, 5, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(6, 13, 5, dtype=torch.float64) * mask[..., None]  # nothing reads padding positions
    (grad,) = torch.autograd.grad((packing.unpack(packed) * upstream).sum(), packed)
    (expected,) = torch.autograd.grad(
        (packed.index_select(0, packing.inverse.flatten()).view(6, 13, 5) * upstream).sum(), packed)
    assert torch.equal(grad, expected)
    padded = torch.randn(6, 13, 5, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(packing.tokens, 5, dtype=torch.float64) * packing.real[:, None]  # nor filler rows
    (grad,) = torch.autograd.grad((packing.pack(padded) * upstream).sum(), padded)
    (expected,) = torch.autograd.grad((padded.flatten(0, 1).index_select(0, packing.index) * upstream).sum(), padded)
    assert torch.equal(grad, expected)
    assert not packing.real.all() and not packing.valid.all()  # both kinds of rows were there to zero


@pytest.mark.parametrize("mask, message", [
    (torch.tensor([[0, 1, 1], [1, 1, 0]]), "right-padded"),   # left padding
    (torch.tensor([[1, 0, 1], [1, 1, 0]]), "right-padded"),   # a hole
    (torch.tensor([[1, 1, 0], [0, 0, 0]]), "right-padded"),   # an empty caption
    (torch.ones(3), "must be"),
])
def test_packing_rejects_masks_it_cannot_pack(mask, message):
    with pytest.raises(ValueError, match=message):
        PackedText.from_mask(mask)
    with pytest.raises(ValueError, match="multiple"):
        PackedText.from_mask(torch.ones(2, 3), multiple=0)


def test_text_transformer_refuses_a_packing_of_other_captions():
    model = build_model("pretrain", tiny_config()).eval()
    ids, mask = captions([3, 5])
    with pytest.raises(ValueError, match="packing needs"):
        model.text_encoder(ids, mask, packing=PackedText.from_mask(torch.ones(2, 4)))
    with pytest.raises(ValueError, match="packing needs"):
        model.text_encoder(ids, None, packing=PackedText.from_mask(mask))


# ---------------------------------------------------------------------------------------------- the model


@pytest.mark.parametrize("mode", ["encoder", "decoder", "cross", "block_context"])
def test_text_transformer_packed_equals_padded(mode):
    """States of the real tokens and every gradient (fp64), in each way pretraining runs the text."""
    model = build_model("pretrain", no_dropout_config()).double()
    ids, mask = captions(CAPTION_LENGTHS)
    image_embeds = torch.randn(6, 17, 64, dtype=torch.float64)
    packing = PackedText.from_mask(mask, multiple=16)
    weights = torch.randn(6, 13, 64, dtype=torch.float64)

    def run(packed: bool):
        encoder = copy.deepcopy(model.text_encoder)
        kwargs = {"packing": packing} if packed else {}
        if mode == "decoder":
            kwargs["causal"] = True
        if mode in ("cross", "block_context"):
            kv = encoder.context_keys_values(image_embeds)
            if mode == "block_context":  # rows 0-2 and rows 3-5 attend to images 0-2, stacked two to an image
                kv = [BlockContext(((k[:3], v[:3], 2, None),)) for k, v in kv]
            kwargs["context_kv"] = kv
        with ops.impl_scope("reference"):
            states = encoder(ids, mask, **kwargs)
        if packed:
            states = packing.unpack(states)
        states = states * mask[..., None]  # padding positions are not outputs
        (states * weights).sum().backward()
        return states.detach(), {n: p.grad for n, p in encoder.named_parameters()}

    packed, padded = run(True), run(False)
    assert rel_err(packed[0], padded[0]) <= PACKED_RTOL[torch.float64]
    expected = {n: g for n, g in padded[1].items() if g is not None}
    assert_grads_match({n: packed[1][n] for n in expected}, expected, PACKED_RTOL[torch.float64])


@pytest.mark.parametrize("reduction", ["mean", "sum_per_sample"])
def test_decoder_loss_packed_equals_padded(reduction):
    model = build_model("pretrain", no_dropout_config()).double()
    ids, mask = captions(CAPTION_LENGTHS)
    ids[:, 0] = model.config.text.bos_token_id
    targets = ids.masked_fill(mask == 0, ops.IGNORE_INDEX)
    context = torch.randn(6, 17, 64, dtype=torch.float64)
    with ops.impl_scope("reference"):
        padded = model.text_decoder.loss(ids, mask, context, None, targets, 0.1, reduction)
        packed = model.text_decoder.loss(ids, mask, context, None, targets, 0.1, reduction,
                                         packing=PackedText.from_mask(mask, multiple=16))
    assert packed.shape == padded.shape and rel_err(packed, padded) <= PACKED_RTOL[torch.float64]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_pretraining_packed_equals_padded(dtype):
    """BlipPretrain's three losses and every gradient, captions packed (with filler rows) or padded."""
    model = build_model("pretrain", no_dropout_config()).to(dtype)
    images = torch.randn(6, 3, 64, 64, dtype=dtype)
    ids, mask = captions(CAPTION_LENGTHS)

    def run(packing):
        twin = copy.deepcopy(model)
        with ops.impl_scope("reference" if dtype == torch.float64 else "auto"):
            losses = twin(images, ids, mask, 0.4, torch.Generator().manual_seed(2), packing=packing)
        sum(losses.values()).backward()
        return ({k: v.detach() for k, v in losses.items()},
                {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}, twin)

    packed = run(PackedText.from_mask(mask, multiple=16))
    padded = run(None)
    rtol = PACKED_RTOL[dtype]
    for name, want in padded[0].items():
        assert torch.isfinite(want) and rel_err(packed[0][name], want) <= rtol, name
    assert_grads_match(packed[1], padded[1], rtol)
    # the momentum encoder and the queues saw the same text too
    assert rel_err(packed[2].text_queue, padded[2].text_queue) <= rtol


def test_pretraining_packed_trains_with_dropout():
    """With dropout on (the default), packed captions still give finite losses and every gradient."""
    model = build_model("pretrain", tiny_config())
    assert isinstance(model, BlipPretrain) and model.config.text.hidden_dropout > 0
    ids, mask = captions(CAPTION_LENGTHS)
    losses = model(torch.randn(6, 3, 64, 64), ids, mask, 0.4, packing=PackedText.from_mask(mask, 8))
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
