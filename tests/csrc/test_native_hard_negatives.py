"""The native extension blip_fast._C against the reference: its CPU twin everywhere, and on a GPU
its CUDA kernel and the Triton kernel through the op registry.

CI builds the extension and sets BLIP_FAST_REQUIRE_NATIVE=1, so that a failed build fails the suite
instead of skipping it. Picks are compared exactly except where a uniform lies within 1e-5 of a cdf
boundary, where implementations that sum the cdf in another order may pick a neighbour.
"""

import os
import subprocess
import sys

import pytest
import torch
from hard_negative_checks import assert_same_picks, make_sim

from blip_fast.kernels.hard_negatives import sample_hard_negatives_ref
from blip_fast.ops import impl_scope, native
from blip_fast.ops.hard_negatives import hard_negatives_op, sample_hard_negatives
from blip_fast.shapes import PRETRAIN_BATCH

needs_native = pytest.mark.skipif(
    not native.HAS_NATIVE, reason=f"blip_fast._C not built ({native.IMPORT_ERROR})"
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BATCH, THREE_BATCHES = PRETRAIN_BATCH, 3 * PRETRAIN_BATCH


def test_native_required_when_asked():
    if os.environ.get("BLIP_FAST_REQUIRE_NATIVE") != "1":
        pytest.skip("BLIP_FAST_REQUIRE_NATIVE is not 1")
    assert native.HAS_NATIVE, f"BLIP_FAST_REQUIRE_NATIVE=1 but blip_fast._C failed: {native.IMPORT_ERROR}"


def test_package_works_without_the_extension():
    code = (
        "import sys; sys.modules['blip_fast._C'] = None\n"
        "import torch\n"
        "from blip_fast.ops import native\n"
        "from blip_fast.ops.hard_negatives import hard_negatives_op, sample_hard_negatives\n"
        "assert not native.HAS_NATIVE and native.IMPORT_ERROR\n"
        "assert 'cuda' not in hard_negatives_op.impls\n"
        "print(sample_hard_negatives(torch.zeros(2, 2)).tolist())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[1, 0]"


@needs_native
def test_registered_for_the_devices_it_was_built_for():
    built_with_cuda = native._C.built_with_cuda()
    assert isinstance(built_with_cuda, bool)
    devices = hard_negatives_op.impls["cuda"].devices
    assert devices == (("cpu", "cuda") if built_with_cuda else ("cpu",))
    assert hard_negatives_op.available(torch.device("cpu"))[0] == "cuda"


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 2), (7, 7), (13, 40), (BATCH, BATCH), (97, 97), (BATCH, THREE_BATCHES),
                                   (5, 3000)])
def test_cpu_twin_matches_reference(shape, dtype):
    torch.manual_seed(0)
    rows, cols = shape
    sim = make_sim(rows, cols, dtype)
    for _ in range(8):
        uniforms = torch.rand(rows)
        expected = sample_hard_negatives_ref(sim, uniforms)
        assert_same_picks(native._C.sample_hard_negatives(sim, uniforms), expected, sim, uniforms)


@needs_native
def test_cpu_twin_many_rows_strided_view_and_fallback():
    """Rows split across threads; BLIP's sim[:, :bs] view; the u = 1 fallback never the diagonal."""
    torch.manual_seed(0)
    wide = make_sim(1000, 1100)
    sim, uniforms = wide[:, 50:1050], torch.rand(1000)
    expected = sample_hard_negatives_ref(sim, uniforms)
    assert_same_picks(native._C.sample_hard_negatives(sim, uniforms), expected, sim, uniforms)
    transposed = make_sim(40, 40).t()  # column stride != 1: copied to contiguous
    uniforms = torch.rand(40)
    expected = sample_hard_negatives_ref(transposed, uniforms)
    assert_same_picks(native._C.sample_hard_negatives(transposed, uniforms), expected, transposed, uniforms)
    assert native._C.sample_hard_negatives(make_sim(3, 3), torch.ones(3)).tolist() == [2, 2, 1]
    assert native._C.sample_hard_negatives(make_sim(3, 5), torch.ones(3)).tolist() == [4, 4, 4]
    # u = 0: the target is 0 and column 0 of row 0 has zero weight, so the pick is column 1.
    sim = make_sim(7, 9)
    expected = sample_hard_negatives_ref(sim, torch.zeros(7))
    assert torch.equal(native._C.sample_hard_negatives(sim, torch.zeros(7)), expected)
    assert expected.tolist() == [1] + [0] * 6


@needs_native
def test_cpu_twin_through_the_registry():
    torch.manual_seed(0)
    sim = make_sim(BATCH, BATCH)
    with impl_scope("cuda"):
        assert hard_negatives_op.select(sim.device) == "cuda"
        picks = sample_hard_negatives(sim, generator=torch.Generator().manual_seed(3))
    uniforms = torch.rand(BATCH, generator=torch.Generator().manual_seed(3))
    assert_same_picks(picks, sample_hard_negatives_ref(sim, uniforms), sim, uniforms)


@needs_native
@pytest.mark.parametrize(
    "sim, uniforms, message",
    [
        (torch.randn(4), torch.rand(4), "must be 2-D"),
        (torch.randn(3, 1), torch.rand(3), "needs at least 2 candidates"),
        (torch.randn(0, 4), torch.rand(0), "at least one row"),
        (torch.randn(5, 3), torch.rand(5), "N >= B"),
        (torch.randn(4, 4).double(), torch.rand(4), "float32, float16 or bfloat16"),
        (torch.randint(0, 9, (4, 4)), torch.rand(4), "float32, float16 or bfloat16"),
        (torch.randn(4, 4), torch.rand(3), "length B=4"),
        (torch.randn(4, 4), torch.rand(4, 1), "1-D"),
        (torch.randn(4, 4), torch.rand(4).double(), "uniforms must be float32"),
        (torch.randn(4, 4), torch.rand(4, device="meta"), "same device"),
    ],
)
def test_cpu_twin_rejects_bad_inputs(sim, uniforms, message):
    with pytest.raises(ValueError, match=message):
        native._C.sample_hard_negatives(sim, uniforms)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [BATCH, 97, THREE_BATCHES])
@pytest.mark.parametrize("extra_columns", [0, 1000])
def test_gpu_backends_match_reference(backend, dtype, rows, extra_columns):
    cuda = torch.device("cuda")
    if backend not in hard_negatives_op.available(cuda):
        pytest.skip(f"backend {backend} not available on CUDA here")
    torch.manual_seed(0)
    wide = make_sim(rows, rows + extra_columns + 7, dtype, "cuda")
    sim = wide[:, : rows + extra_columns]  # a strided view, as BLIP slices sim[:, :bs]
    for _ in range(8):
        uniforms = torch.rand(rows, device=cuda)
        expected = sample_hard_negatives_ref(sim, uniforms)
        actual = hard_negatives_op.function(backend)(sim, uniforms)
        assert actual.device == sim.device and actual.dtype == torch.int64
        assert_same_picks(actual, expected, sim, uniforms)
    fallback = hard_negatives_op.function(backend)(make_sim(3, 3, dtype, "cuda"), torch.ones(3, device=cuda))
    assert fallback.tolist() == [2, 2, 1]
    lowest = hard_negatives_op.function(backend)(make_sim(7, 9, dtype, "cuda"), torch.zeros(7, device=cuda))
    assert lowest.tolist() == [1] + [0] * 6
