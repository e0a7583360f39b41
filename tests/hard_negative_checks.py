"""Inputs and comparisons shared by the hard-negative sampler tests (Triton kernel and native extension)."""

import torch

from blip_fast.kernels.hard_negatives import near_cdf_boundary


def make_sim(rows, cols, dtype=torch.float32, device="cpu"):
    """ITC-like logits: spread of several units, positives on the diagonal standing out."""
    sim = 4.0 * torch.randn(rows, cols)
    sim[:, :rows] += 8.0 * torch.eye(rows)
    return sim.to(device=device, dtype=dtype)


def assert_same_picks(actual, expected, sim, uniforms):
    """Equal picks except where the uniform sits on a cdf boundary; report mismatch counts."""
    actual, expected = actual.cpu(), expected.cpu()
    near = near_cdf_boundary(sim.cpu(), uniforms.cpu())
    differ = actual != expected
    bad = differ & ~near
    assert not bad.any(), (
        f"{int(bad.sum())} of {len(bad)} picks differ away from cdf boundaries "
        f"(rows {bad.nonzero().flatten().tolist()[:10]}); {int(near.sum())} rows near a boundary, "
        f"{int((differ & near).sum())} of them differ"
    )
    assert (actual != torch.arange(len(actual))).all(), "an implementation picked the positive"
