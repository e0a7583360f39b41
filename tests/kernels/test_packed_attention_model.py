"""The model with its packed rows attending through the packed attention kernel (no unpacking) against the model
unpacking around the reference attention: the same states, losses and gradients.

The kernel runs where ``varlen_attention=triton`` (self-attention) or ``varlen_cross_attention=triton`` is asked
for; without a GPU these tests let it run on CPU
tensors in Triton's interpreter. fp32, dropout off (its masks differ between the two), tolerance 1e-5 relative
(key biases, whose gradient vanishes in exact arithmetic, on their key weight's scale, as test_packing.py).
"""

import copy
import dataclasses

import pytest
import torch
from backend_helpers import let_backend_run_on
from packing_checks import CAPTION_LENGTHS, assert_grads_match, captions, no_dropout_config
from tensor_checks import rel_err

from blip_fast import ops, tolerances
from blip_fast.models import build_model, fast_passes
from blip_fast.models.fast_passes import BlockContext, PackedAttention
from blip_fast.models.packing import PackedText
from blip_fast.ops.varlen_attention import varlen_attention_op, varlen_cross_attention_op

RTOL = tolerances.RTOL[torch.float32]
PACKED_OPS = (varlen_attention_op, varlen_cross_attention_op)
# the kernel for self-attention, for cross-attention, for both
SELF, CROSS = "auto,varlen_attention=triton", "auto,varlen_cross_attention=triton"
BOTH = "auto,varlen_attention=triton,varlen_cross_attention=triton"

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture
def kernel_here(triton_device, monkeypatch):
    """Let the kernel run where the Triton tests run (on CPU tensors too, in the interpreter) when it is asked for."""
    for op in PACKED_OPS:
        let_backend_run_on(monkeypatch, op, (triton_device,))


@pytest.fixture
def kernel_calls(kernel_here, monkeypatch):
    """:func:`kernel_here`, recording the name of the op of each kernel call (eager code only: dynamo would guard on
    the list)."""
    calls = []
    for op in PACKED_OPS:
        impl = op.impls["triton"]

        def counted(*args, name=op.name, fn=impl.fn, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)

        monkeypatch.setitem(op.impls, "triton", dataclasses.replace(impl, fn=counted))
    return calls


@pytest.mark.parametrize("mode", ["encoder", "decoder", "cross", "block_context_picked_rows", "dense_rows"])
def test_triton_text_transformer_kernel_equals_unpacked(kernel_calls, mode):
    """States of the real tokens and every gradient (the context's too), in each way pretraining runs the text."""
    model = build_model("pretrain", no_dropout_config())
    ids, mask = captions(CAPTION_LENGTHS)
    image_embeds = torch.randn(6, 17, 64)
    packing = PackedText.from_mask(mask, multiple=16)
    rows = 6
    if mode == "dense_rows":  # ITM's layout: packed rows, rows that keep their padding, packed rows
        ids, mask = torch.cat([ids, ids.flip(0), ids]), torch.cat([mask, mask.flip(0), mask])
        packing = PackedText.concat([packing, PackedText.dense(6, ids.shape[1], "cpu"), packing])
        rows = 18
    weights = torch.randn(rows, ids.shape[1], 64)

    def run(impl: str):
        encoder = copy.deepcopy(model.text_encoder)
        context = image_embeds.clone().requires_grad_()
        kwargs = {"packing": packing}
        if mode == "decoder":
            kwargs["causal"] = True
        if mode in ("cross", "block_context_picked_rows", "dense_rows"):
            kv = encoder.context_keys_values(context)
            if mode == "block_context_picked_rows":  # images 0-5 twice, then images picked out of order
                picked = torch.tensor([3, 3, 0, 5, 1, 3])
                kv = [BlockContext(((k, v, 1, None), (k, v, 1, picked))) for k, v in kv]
                ids_, mask_ = torch.cat([ids, ids]), torch.cat([mask, mask])
                kwargs["packing"] = PackedText.concat([packing, packing])
            if mode == "dense_rows":  # every image attended by three rows
                kv = [BlockContext(((k, v, 3, None),)) for k, v in kv]
            kwargs["context_kv"] = kv
        run_ids, run_mask = (ids_, mask_) if mode == "block_context_picked_rows" else (ids, mask)
        with ops.impl_scope(impl):
            states = encoder(run_ids, run_mask, **kwargs)
        states = kwargs["packing"].unpack(states) * run_mask[..., None]  # padding positions are not outputs
        (states * torch.cat([weights] * (states.shape[0] // rows))).sum().backward()
        grads = {n: p.grad for n, p in encoder.named_parameters()}
        grads["context"] = context.grad
        return states.detach(), grads

    kernel = run(BOTH)
    per_layer = ["varlen_attention"] + (["varlen_cross_attention"] if mode not in ("encoder", "decoder") else [])
    assert kernel_calls == per_layer * 2  # 2 layers
    unpacked = run("reference")
    assert rel_err(kernel[0], unpacked[0]) <= RTOL
    expected = {n: g for n, g in unpacked[1].items() if g is not None}
    assert_grads_match({n: kernel[1][n] for n in expected}, expected, RTOL)


@pytest.mark.parametrize("impl, self_calls, cross_calls, joint_tile", [(SELF, 6, 0, None), (SELF, 8, 0, 8),
                                                                        (CROSS, 0, 2, None)])
def test_triton_pretraining_kernel_equals_unpacked(kernel_calls, monkeypatch, impl, self_calls, cross_calls,
                                                   joint_tile):
    """BlipPretrain's three losses and every gradient, with the kernel for self-attention or for cross-attention
    and the other attention unpacking (both on the kernel: the compiled test below): ITM's hard negatives read their
    images' rows in place. ``joint_tile``: captions longer than the single tile keep ITM's and LM's
    self-attention in a launch each (here, a tile of 8 rows)."""
    if joint_tile is not None:
        monkeypatch.setattr(fast_passes, "VARLEN_MAX_TILE", joint_tile)
    model = build_model("pretrain", no_dropout_config())
    images = torch.randn(6, 3, 64, 64)
    ids, mask = captions(CAPTION_LENGTHS)
    packing = PackedText.from_mask(mask, multiple=16)

    def run(impl: str):
        twin = copy.deepcopy(model)
        with ops.impl_scope(impl):
            losses = twin(images, ids, mask, 0.4, torch.Generator().manual_seed(2), packing=packing)
        sum(losses.values()).backward()
        return ({k: v.detach() for k, v in losses.items()},
                {n: p.grad for n, p in twin.named_parameters() if p.requires_grad})

    kernel = run(impl)
    # self-attention: unimodal encoder, momentum encoder, and ITM's and LM's passes in one launch (per-sequence
    # causal); cross-attention: their joint call (BlipPretrain.joint_grounded_passes); 2 layers each
    assert (kernel_calls.count("varlen_attention"), kernel_calls.count("varlen_cross_attention")) == (
        self_calls, cross_calls)
    unpacked = run("reference")
    for name, want in unpacked[0].items():
        assert rel_err(kernel[0][name], want) <= RTOL, name
    assert_grads_match(kernel[1], unpacked[1], RTOL)


def test_plan_falls_back_where_a_table_cannot_describe_the_context(kernel_here):
    """A padded context, segments reading different keys, or layers picking other rows (by identity: comparing
    values would wait for the device) keep the cross-attention unpacked (its table None); the self-attention's table
    stays. Each table exists only where its op selects the kernel."""
    ids, mask = captions(CAPTION_LENGTHS)
    packing = PackedText.from_mask(mask)
    k = torch.randn(6, 2, 5, 8)
    like = torch.randn(3, 8)
    padding = mask.bool()

    def plan(context_kv, context_mask=None, impl=BOTH):
        with ops.impl_scope(impl):
            return PackedAttention.plan(packing, padding, False, context_kv, context_mask, like)

    other = k.clone()
    two_keys = BlockContext(((k[:3], k[:3], 1, None), (other[:3], other[:3], 1, None)))
    picked, same = torch.tensor([2, 0, 1, 5, 4, 3]), torch.tensor([2, 0, 1, 5, 4, 3])
    other_rows = [BlockContext(((k, k, 1, picked),)), BlockContext(((other, other, 1, same),))]
    # one table must serve each layer
    for context_kv, context_mask in [([(k, k)], torch.ones(6, 5, dtype=torch.bool)), ([two_keys], None),
                                     (other_rows, None)]:
        fallback = plan(context_kv, context_mask)
        assert fallback.cross_attention is None and fallback.self_attention is not None
        assert plan(context_kv, context_mask, CROSS) is None
    shared = [BlockContext(((k, k, 1, None),))]
    both = plan(shared)
    assert torch.equal(both.cross_attention.kv_group, torch.arange(6, dtype=torch.int32))
    assert both.self_attention is not None
    assert plan(shared, impl=CROSS).self_attention is None and plan(shared, impl=SELF).cross_attention is None
    assert plan(shared, impl="auto") is None


def test_triton_compiled_blocks_with_the_kernel_match_eager(kernel_here):
    """The kernel's custom ops inside block-compiled text layers (``aot_eager``, fullgraph: dynamo and AOTAutograd trace
    their fake and autograd registrations) give the eager losses and gradients, and a third caption length compiles
    nothing more (the tables' lengths and token counts are symbolic after the second)."""
    from torch._dynamo.utils import counters

    from blip_fast.models.compile import compile_blocks

    torch._dynamo.reset()
    counters.clear()
    eager = build_model("pretrain", no_dropout_config())
    compiled = copy.deepcopy(eager)
    # the layers of the text passes with cross-attention (ITM's picked rows, the decoder's causal self-attention);
    # the unimodal pass runs the encoder's layers too. The ViT and the momentum copies stay eager: less to trace.
    assert compile_blocks(compiled.text_encoder, backend="aot_eager", fullgraph=True) == 2
    assert compile_blocks(compiled.text_decoder, backend="aot_eager", fullgraph=True) == 2

    def run(model, lengths):
        ids, mask = captions(lengths, seed=len(lengths))
        with ops.impl_scope(BOTH):
            losses = model(torch.randn(len(lengths), 3, 64, 64, generator=torch.Generator().manual_seed(1)), ids,
                           mask, 0.4, torch.Generator().manual_seed(2), packing=PackedText.from_mask(mask, 8))
        sum(losses.values()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return {k: v.detach() for k, v in losses.items()}, grads

    try:
        want, got = run(eager, [7, 3, 9, 5]), run(compiled, [7, 3, 9, 5])
        for name, value in want[0].items():
            assert rel_err(got[0][name], value) <= RTOL, name
        assert_grads_match(got[1], want[1], RTOL)
        run(compiled, [4, 12, 6, 11])  # a second length: the layers recompile with symbolic lengths
        graphs = counters["stats"]["unique_graphs"]
        run(compiled, [5, 8, 3, 10])
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        torch._dynamo.reset()


def test_triton_flop_count_equals_the_unpacked_passes(kernel_here):
    """torch's FLOP counter sees the kernel's custom ops through their registered formulas: a text pass with
    cross-attention, forward and backward, counts the FLOPs of the same pass unpacking around the reference
    attention (which multiplies padded (B, L) blocks), so ``bench step`` reports comparable MFU for both."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model("pretrain", no_dropout_config())
    ids, mask = captions(CAPTION_LENGTHS)
    packing = PackedText.from_mask(mask, multiple=16)

    def count(impl: str) -> int:
        encoder = copy.deepcopy(model.text_encoder)
        with ops.impl_scope(impl), FlopCounterMode(display=False) as counter:
            states = encoder(ids, mask, packing=packing,
                             context_kv=encoder.context_keys_values(torch.randn(6, 17, 64)))
            states.sum().backward()
        return counter.get_total_flops()

    assert count(BOTH) == count("reference") > 0
