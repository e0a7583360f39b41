"""ITM's negatives in retrieval fine-tuning (blip_fast.models.blip_retrieval.sample_negatives): never a caption of
the same image, drawn in proportion to the ITC softmax among the others; a row with no true negative still gets a
column other than its own. The comparison of the whole fine-tuning step with the original is in
tests/test_original_finetune.py."""

import torch

from blip_fast.models.blip_retrieval import sample_negatives


def test_same_image_columns_are_never_drawn_and_the_rest_follow_the_softmax():
    image_ids = torch.tensor([0, 1, 1, 2, 2, 2])
    excluded = image_ids[:, None] == image_ids[None, :]
    sim = torch.randn(6, 6, generator=torch.Generator().manual_seed(0)) * 2
    generator = torch.Generator().manual_seed(1)
    draws = torch.stack([sample_negatives(sim, excluded, 0, generator) for _ in range(4000)])  # (4000, 6)
    assert not excluded.gather(1, draws.t()).any()
    expected = torch.softmax(sim, dim=1).masked_fill(excluded, 0)
    expected /= expected.sum(dim=1, keepdim=True)
    counts = torch.stack([torch.bincount(draws[:, row], minlength=6) for row in range(6)]).float() / 4000
    torch.testing.assert_close(counts, expected, rtol=0, atol=0.03)  # 4000 draws: sd below 0.008 per column


def test_a_row_without_a_true_negative_draws_another_column_not_its_own():
    excluded = torch.ones(3, 6, dtype=torch.bool)  # every candidate shares the image
    sim = torch.zeros(3, 6)
    sim[:, 3:] = 50.0  # this rank's own pairs are columns 3..5 (offset 3): they would win
    picks = torch.stack([sample_negatives(sim, excluded, 3, torch.Generator().manual_seed(s)) for s in range(50)])
    assert (picks != torch.arange(3, 6)).all()
    assert set(picks.flatten().tolist()) <= {3, 4, 5}
