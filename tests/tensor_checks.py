"""Error measures shared by the parity tests."""

import torch

from blip_fast.tolerances import PARITY_FLOOR, RTOL


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|actual - expected| / max|expected|``, computed in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def assert_close_to_truth(actual, truth, low=None, dtype=torch.float32, what=""):
    """A kernel's result against the fp64 ``truth``: fp32 within ``RTOL`` (1e-5 relative); fp16/bf16 by
    flash-attention's rule (``PARITY_FLOOR``, blip_fast.tolerances), with ``low`` the reference evaluated in that
    dtype."""
    actual, truth = actual.detach().double().cpu(), truth.detach().double().cpu()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual - truth).abs().max().item()
    scale = truth.abs().max().item()
    if dtype == torch.float32:
        rtol = RTOL[torch.float32]
        assert err <= rtol * scale, f"{what}: relative error {err / scale:.2e} > {rtol:g}"
        return
    err_low = (low.detach().double().cpu() - truth).abs().max().item()
    bound = 2 * err_low + PARITY_FLOOR[dtype] * scale
    mismatches = int(((actual - truth).abs() > bound).sum())
    assert err <= bound, f"{what}: error {err:.2e} > bound {bound:.2e} ({mismatches} of {actual.numel()} elements)"
