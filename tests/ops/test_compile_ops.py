"""The ops under ``torch.compile(fullgraph=True)``: no graph break, same results as eager.

The fast hard-negative samplers are ``torch.library`` custom ops (``blip_fast::sample_hard_negatives_*``)
with fake implementations; the reference is plain PyTorch that dynamo traces. Picks are integers,
compared for equality: the compiled graph feeds the sampler the same similarities and uniforms.
"""

import os

import pytest
import torch
import torch._dynamo.testing

from blip_fast import ops
from blip_fast.kernels.hard_negatives import sample_hard_negatives_ref
from blip_fast.ops.hard_negatives import (
    hard_negatives_op,
    sample_hard_negatives_native_op,
    sample_hard_negatives_triton_op,
)
from blip_fast.shapes import PRETRAIN_BATCH

CPU_BACKENDS = hard_negatives_op.available(torch.device("cpu"))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def negatives_of_features(image_feat, text_feat, temp, uniforms):
    """A slice of BLIP's ITM step: in-batch ITC similarities, then one hard negative per text."""
    sim_t2i = text_feat @ image_feat.t() / temp  # (B, B)
    return ops.sample_hard_negatives(sim_t2i, uniforms)


def features(batch: int, dim: int = 32):
    image = torch.nn.functional.normalize(torch.randn(batch, dim), dim=-1)
    text = torch.nn.functional.normalize(image + 0.5 * torch.randn(batch, dim), dim=-1)
    return image, text


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fullgraph_compile_matches_eager(backend):
    compiled = torch.compile(negatives_of_features, fullgraph=True)
    with ops.impl_scope(backend):
        for batch in (7, 7, 12):  # a repeat (cached graph) and a new batch size
            image, text = features(batch)
            uniforms = torch.rand(batch)
            expected = negatives_of_features(image, text, 0.07, uniforms)
            assert torch.equal(compiled(image, text, 0.07, uniforms), expected), f"{backend} B={batch}"
            sim = text @ image.t() / 0.07
            assert torch.equal(expected, sample_hard_negatives_ref(sim, uniforms))


def test_generator_draws_outside_the_compiled_graph_give_the_eager_picks():
    """Eager with a generator == compiled with uniforms drawn from an equally seeded generator."""
    image, text = features(9)
    sim = text @ image.t() / 0.07
    expected = ops.sample_hard_negatives(sim, generator=torch.Generator().manual_seed(5))
    compiled = torch.compile(ops.sample_hard_negatives, fullgraph=True)
    uniforms = torch.rand(9, generator=torch.Generator().manual_seed(5))
    assert torch.equal(compiled(sim, uniforms), expected)


def test_global_generator_inside_the_graph():
    """``generator=None`` draws inside the graph; with inductor's ``fallback_random`` it is torch.rand's
    draw, so the same global seed gives the eager picks."""
    image, text = features(9)
    sim = text @ image.t() / 0.07

    def sample(sim):
        return ops.sample_hard_negatives(sim)

    torch.manual_seed(11)
    expected = sample(sim)
    with torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(sample, fullgraph=True)
        torch.manual_seed(11)
        assert torch.equal(compiled(sim), expected)


@pytest.mark.skipif("cuda" not in CPU_BACKENDS, reason="blip_fast._C is not built")
def test_native_sampler_is_one_node_of_the_graph():
    recorder = torch._dynamo.testing.EagerAndRecordGraphs()
    image, text = features(7)
    with ops.impl_scope("cuda"):
        torch.compile(negatives_of_features, fullgraph=True, backend=recorder)(image, text, 0.07, torch.rand(7))
    (graph,) = recorder.graphs
    targets = [node.target for node in graph.graph.nodes if node.op == "call_function"]
    assert torch.ops.blip_fast.sample_hard_negatives_native.default in targets, targets


def test_custom_ops_pass_opcheck():
    sim, uniforms = 4.0 * torch.randn(7, 12), torch.rand(7)
    if "cuda" in CPU_BACKENDS:
        torch.library.opcheck(sample_hard_negatives_native_op, (sim, uniforms))
    with pytest.raises(ValueError, match="N >= B"):  # the fake checks inputs as the kernels do
        with torch._subclasses.FakeTensorMode():
            sample_hard_negatives_native_op(torch.empty(5, 3), torch.empty(5))


@pytest.mark.gpu
@pytest.mark.parametrize("op", [sample_hard_negatives_native_op, sample_hard_negatives_triton_op])
def test_custom_ops_pass_opcheck_on_gpu(op):
    if op is sample_hard_negatives_native_op and "cuda" not in hard_negatives_op.available(torch.device("cuda")):
        # a build without a CUDA toolkit is allowed, unless the run demands the native kernels (as CI does)
        assert os.environ.get("BLIP_FAST_REQUIRE_NATIVE") != "1", "BLIP_FAST_REQUIRE_NATIVE=1 but blip_fast._C " \
            "was built without CUDA on a CUDA machine"
        pytest.skip("blip_fast._C was built without CUDA (set BLIP_FAST_REQUIRE_NATIVE=1 to make this a failure)")
    batch = PRETRAIN_BATCH
    sim, uniforms = 4.0 * torch.randn(batch, batch, device="cuda"), torch.rand(batch, device="cuda")
    torch.library.opcheck(op, (sim, uniforms))
    compiled = torch.compile(negatives_of_features, fullgraph=True)
    image, text = (t.cuda() for t in features(batch))
    with ops.impl_scope("triton" if op is sample_hard_negatives_triton_op else "cuda"):
        assert torch.equal(compiled(image, text, 0.07, uniforms), negatives_of_features(image, text, 0.07, uniforms))
