"""Hard-negative sampling: properties of the reference, and the Triton kernel against it.

Without CUDA the Triton kernel runs in Triton's interpreter (fp32/fp16; the interpreter cannot
hold bf16, so bf16 parity is a GPU test). Implementations round the cdf in different orders, so a
uniform within 1e-5 (relative) of a cdf boundary may pick the neighbouring column: picks are
compared exactly everywhere else.
"""

import subprocess
import sys

import pytest
import torch
from hard_negative_checks import assert_same_picks, make_sim

from blip_fast.kernels import hard_negatives as hn
from blip_fast.ops.hard_negatives import hard_negatives_op, sample_hard_negatives
from blip_fast.shapes import PRETRAIN_BATCH

BATCH, THREE_BATCHES = PRETRAIN_BATCH, 3 * PRETRAIN_BATCH
SHAPES_INTERPRETER = [(2, 2), (7, 7), (13, 40), (BATCH, BATCH)]
SHAPES_GPU = [(BATCH, BATCH), (97, 97), (THREE_BATCHES, THREE_BATCHES), (BATCH, THREE_BATCHES)]


@pytest.fixture
def triton_hn(triton_device):
    """The kernel module, where its kernel can run (see conftest.py)."""
    return hn


# -- reference ------------------------------------------------------------------------------------


def test_hand_computed_picks():
    torch.manual_seed(0)
    # Two candidates: the only negative of each row is the other column, whatever the uniform.
    for u in (0.0, 0.5, 0.999):
        assert hn.sample_hard_negatives_ref(torch.zeros(2, 2), torch.full((2,), u)).tolist() == [1, 0]
    # Row 0 of logits [0, ln 3, 0]: weights [0, 0.6 + 1e-4, 0.2 + 1e-4], cdf [0, 0.6001, 0.8002].
    sim = torch.tensor([[0.0, torch.log(torch.tensor(3.0)).item(), 0.0]])
    uniforms = (0.0, 0.5, 0.74, 0.76, 0.99)
    picks = [hn.sample_hard_negatives_ref(sim, torch.tensor([u])).item() for u in uniforms]
    assert picks == [1, 1, 1, 2, 2]  # boundary at 0.6001 / 0.8002 = 0.74994
    # N > B, equal logits: every negative weighs 0.25 + 1e-4; cdf of row 1 is [w, w, 2w, 3w].
    picks = hn.sample_hard_negatives_ref(torch.zeros(2, 4), torch.tensor([0.5, 0.3]))
    assert picks.tolist() == [2, 0]  # row 0: 0.5 * 3w lands in column 2; row 1: 0.3 * 3w < w
    picks = hn.sample_hard_negatives_ref(torch.zeros(2, 4), torch.tensor([0.0, 0.34]))
    assert picks.tolist() == [1, 2]  # column 0 of row 0 has zero weight; 0.34 * 3w > w skips column 1


def test_fallback_never_returns_the_diagonal():
    torch.manual_seed(0)
    # u = 1 puts the target on cdf[-1] exactly: no column passes it, so the fallback decides. It is
    # outside the [0, 1) contract but is what rounding of u * cdf[-1] can produce.
    picks = hn.sample_hard_negatives_ref(make_sim(3, 3), torch.ones(3))
    assert picks.tolist() == [2, 2, 1]
    picks = hn.sample_hard_negatives_ref(make_sim(3, 5), torch.ones(3))
    assert picks.tolist() == [4, 4, 4]


@pytest.mark.parametrize("shape", [(2, 2), (7, 7), (13, 40), (97, 97), (BATCH, THREE_BATCHES)])
def test_reference_never_returns_the_diagonal(shape):
    torch.manual_seed(0)
    rows, cols = shape
    sim = make_sim(rows, cols)
    sim[:, :rows] += 50.0 * torch.eye(rows)  # positives take all but the 1e-4 floors
    for uniforms in (torch.rand(rows), torch.zeros(rows), torch.full((rows,), 1.0 - 2.0**-24)):
        picks = hn.sample_hard_negatives_ref(sim, uniforms)
        assert picks.dtype == torch.int64 and picks.shape == (rows,)
        assert ((picks >= 0) & (picks < cols)).all()
        assert (picks != torch.arange(rows)).all()


def test_reference_samples_the_original_distribution():
    """Empirical frequencies against softmax + 1e-4 with the diagonal removed (the original's weights).

    Pearson's chi-square summed over 3 rows of 4 negatives each has 3 * 3 = 9 degrees of freedom;
    its 99.9% quantile is 27.88, so a correct sampler fails this bound once in a thousand seeds.
    """
    torch.manual_seed(0)
    rows, cols, draws = 3, 5, 2000
    sim = torch.randn(rows, cols)
    weights = torch.softmax(sim.double(), dim=1) + 1e-4
    weights.fill_diagonal_(0)
    expected = draws * weights / weights.sum(dim=1, keepdim=True)  # [rows, cols]
    counts = torch.zeros(rows, cols, dtype=torch.float64)
    for _ in range(draws):
        picks = hn.sample_hard_negatives_ref(sim, torch.rand(rows))
        counts[torch.arange(rows), picks] += 1
    assert (counts.diagonal() == 0).all()
    off_diagonal = ~torch.eye(rows, cols, dtype=torch.bool)
    assert (expected[off_diagonal] >= 5).all(), "chi-square needs >= 5 expected draws per cell"
    chi2 = ((counts - expected)[off_diagonal] ** 2 / expected[off_diagonal]).sum().item()
    assert chi2 < 27.88, f"chi-square {chi2:.2f} over 9 degrees of freedom"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_low_precision_inputs(dtype):
    torch.manual_seed(0)
    sim, uniforms = make_sim(97, 97, dtype), torch.rand(97)
    picks = hn.sample_hard_negatives_ref(sim, uniforms)
    # The reference computes in fp32: a half input is the same as its exact fp32 upcast.
    assert torch.equal(picks, hn.sample_hard_negatives_ref(sim.float(), uniforms))
    assert (picks != torch.arange(97)).all()


def test_reference_reads_column_slices():
    """BLIP passes sim[:, :bs] of the [bs, bs + queue] similarity: a strided view."""
    torch.manual_seed(0)
    wide, uniforms = make_sim(BATCH, 400), torch.rand(BATCH)
    view = wide[:, :BATCH]
    expected = hn.sample_hard_negatives_ref(view.clone(), uniforms)
    assert torch.equal(hn.sample_hard_negatives_ref(view, uniforms), expected)


BAD_INPUTS = [
    (lambda: (torch.randn(4), torch.rand(4)), "must be 2-D"),
    (lambda: (torch.randn(3, 1), torch.rand(3)), "needs at least 2 candidates"),
    (lambda: (torch.randn(1, 1), torch.rand(1)), "needs at least 2 candidates"),
    (lambda: (torch.randn(0, 4), torch.rand(0)), "at least one row"),
    (lambda: (torch.randn(5, 3), torch.rand(5)), "N >= B"),
    (lambda: (torch.randint(0, 9, (4, 4)), torch.rand(4)), "float32, float16 or bfloat16"),
    (lambda: (torch.randn(4, 4), torch.rand(3)), "length B=4"),
    (lambda: (torch.randn(4, 4), torch.rand(4, 1)), "1-D"),
    (lambda: (torch.randn(4, 4), torch.rand(4).half()), "uniforms must be float32"),
    (lambda: (torch.randn(4, 4), torch.rand(4, device="meta")), "same device"),
]
# float64 is for the reference only (parity checks run it in fp64); the kernels reject it.
FLOAT64_INPUTS = [
    (lambda: (torch.randn(4, 4).double(), torch.rand(4)), "float32, float16 or bfloat16"),
    (lambda: (torch.randn(4, 4), torch.rand(4).double()), "uniforms must be float32"),
]


@pytest.mark.parametrize("make, message", BAD_INPUTS)
def test_reference_rejects_bad_inputs(make, message):
    with pytest.raises(ValueError, match=message):
        hn.sample_hard_negatives_ref(*make())


def test_reference_computes_float64_in_float64():
    torch.manual_seed(0)
    sim, uniforms = make_sim(97, 97), torch.rand(97)
    picks = hn.sample_hard_negatives_ref(sim.double(), uniforms.double())
    assert_same_picks(picks, hn.sample_hard_negatives_ref(sim, uniforms), sim, uniforms)


# -- public entry ---------------------------------------------------------------------------------


def test_public_entry_draws_uniforms_from_the_generator():
    torch.manual_seed(0)
    sim = make_sim(BATCH, BATCH)
    first = sample_hard_negatives(sim, generator=torch.Generator().manual_seed(7))
    again = sample_hard_negatives(sim, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, again)
    uniforms = torch.rand(BATCH, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, hn.sample_hard_negatives_ref(sim, uniforms))
    with pytest.raises(ValueError, match="needs at least 2 candidates"):
        sample_hard_negatives(torch.randn(1, 1))


def test_parity_cases_on_cpu_backends():
    """Every registered parity case, exactly, for each backend available on CPU."""
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    assert hard_negatives_op.parity_cases and all(case.exact for case in hard_negatives_op.parity_cases)
    for backend in hard_negatives_op.available(cpu):
        for case in hard_negatives_op.parity_cases:
            for dtype in case.dtypes:
                args, kwargs = case.make_inputs(cpu, dtype, torch.Generator().manual_seed(0))
                assert not hn.near_cdf_boundary(*args).any()
                expected = hard_negatives_op.reference(*args, **kwargs)
                actual = hard_negatives_op.function(backend)(*args, **kwargs)
                assert torch.equal(actual, expected), f"{backend} {case.shape} {dtype}"


def test_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, pytest\n"
        "from blip_fast.kernels import hard_negatives as hn\n"
        "assert not hn.HAS_TRITON\n"
        "print(hn.sample_hard_negatives_ref(torch.zeros(2, 2), torch.rand(2)).tolist())\n"
        "with pytest.raises(RuntimeError, match='triton is not installed'):\n"
        "    hn.sample_hard_negatives_triton(torch.zeros(2, 2), torch.rand(2))\n"
        "import blip_fast.ops.hard_negatives\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[1, 0]"


# -- Triton kernel --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES_INTERPRETER)
def test_triton_matches_reference(triton_hn, shape, dtype):
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows, cols = shape
    sim = make_sim(rows, cols, dtype, device)
    for _ in range(3):
        uniforms = torch.rand(rows, device=device)
        expected = triton_hn.sample_hard_negatives_ref(sim, uniforms)
        assert_same_picks(triton_hn.sample_hard_negatives_triton(sim, uniforms), expected, sim, uniforms)


def test_triton_multi_block_rows_slices_and_edges(triton_hn, monkeypatch):
    """Rows longer than one block (forced small here), strided views, u = 1 (fallback) and u = 0."""
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setattr(triton_hn, "MAX_BLOCK_N", 16)  # 40 columns -> 3 blocks
    wide = make_sim(13, 64, device=device)
    sim = wide[:, 3:43]
    for _ in range(3):
        uniforms = torch.rand(13, device=device)
        expected = triton_hn.sample_hard_negatives_ref(sim, uniforms)
        assert_same_picks(triton_hn.sample_hard_negatives_triton(sim, uniforms), expected, sim, uniforms)
    square = make_sim(3, 3, device=device)
    picks = triton_hn.sample_hard_negatives_triton(square, torch.ones(3, device=device))
    assert picks.tolist() == [2, 2, 1]
    # u = 0: the target is 0 and column 0 of row 0 has zero weight, so the pick is column 1.
    zeros = torch.zeros(7, device=device)
    picks = triton_hn.sample_hard_negatives_triton(make_sim(7, 9, device=device), zeros)
    assert picks.tolist() == [1] + [0] * 6


def test_triton_first_block_of_minus_infinity(triton_hn, monkeypatch):
    """A row whose first column block is all -inf (masked logits) still samples as the reference does: the online
    softmax's running max stays -inf through that block, where exp(-inf - -inf) would make every weight NaN and the
    pick the fallback column."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setattr(triton_hn, "MAX_BLOCK_N", 16)  # 40 columns -> 3 blocks
    sim = make_sim(3, 40, device=device)
    sim[:, :16] = float("-inf")
    for seed in range(3):
        uniforms = torch.rand(3, generator=torch.Generator().manual_seed(seed)).to(device)
        expected = triton_hn.sample_hard_negatives_ref(sim, uniforms)
        assert_same_picks(triton_hn.sample_hard_negatives_triton(sim, uniforms), expected, sim, uniforms)


@pytest.mark.parametrize("make, message", BAD_INPUTS + FLOAT64_INPUTS)
def test_triton_rejects_bad_inputs(triton_hn, make, message):
    with pytest.raises(ValueError, match=message):
        triton_hn.sample_hard_negatives_triton(*make())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES_GPU)
def test_triton_matches_reference_on_gpu(triton_hn, shape, dtype):
    torch.manual_seed(0)
    rows, cols = shape
    sim = make_sim(rows, cols, dtype, "cuda")
    for _ in range(8):
        uniforms = torch.rand(rows, device="cuda")
        expected = hn.sample_hard_negatives_ref(sim, uniforms)
        assert_same_picks(triton_hn.sample_hard_negatives_triton(sim, uniforms), expected, sim, uniforms)
