"""Retrieval evaluation: recall@K as the original itm_eval, and the ITM re-ranking scores."""

import pytest
import torch

from blip_fast.config import tiny_config
from blip_fast.evaluation.recall import recall_at_k
from blip_fast.evaluation.retrieval import retrieval_scores
from blip_fast.models.blip_pretrain import BlipPretrain


def test_recall_at_k_by_hand():
    # 2 images with 2 captions each; texts 0,1 -> image 0, texts 2,3 -> image 1
    img2txt, txt2img = [[0, 1], [2, 3]], [0, 0, 1, 1]
    score_i2t = torch.tensor([[0.1, 0.9, 0.5, 0.0],     # image 0: best text 1 (its own) -> rank 0
                              [0.9, 0.8, 0.1, 0.7]])    # image 1: own texts at ranks 3 and 2 -> rank 2
    score_t2i = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.5]])  # texts 0,2 right; 1,3 wrong
    m = recall_at_k(score_i2t, score_t2i, img2txt, txt2img)
    assert (m["txt_r1"], m["txt_r5"]) == (50.0, 100.0)
    assert (m["img_r1"], m["img_r5"]) == (50.0, 100.0)
    assert m["chance_r1"] == 50.0
    assert m["r_mean"] == pytest.approx((50 + 100 + 100 + 50 + 100 + 100) / 6)


@pytest.mark.parametrize("batch_size", [4, 7, 64])  # 1, 2 (then a partial chunk) and all 5 images per chunk
def test_itm_reranking_scores_equal_scoring_each_pair_alone(batch_size):
    # the evaluation shares each image's cross-attention keys/values among its candidate pairs (stacked
    # queries for the texts of an image, gathered rows for the images of a text); fp32, 1e-5
    model = BlipPretrain(tiny_config()).eval()
    images = torch.randn(5, 3, 64, 64)
    ids = torch.randint(1000, 2000, (7, 9))
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    score_i2t, score_t2i = retrieval_scores(model, images, ids, mask, itm_k=3, batch_size=batch_size)
    with torch.no_grad():
        embeds = model.image_embeds(images)
        sim = model.image_features(embeds) @ model.text_features(ids, mask).t()
        enc = model.with_enc(ids)

        def pair(i, t):
            return model.itm_logits(embeds[i:i + 1], enc[t:t + 1], mask[t:t + 1])[0, 1] + sim[i, t]

        for i in range(5):
            top = sim[i].topk(3).indices.tolist()
            for t in range(7):
                expected = pair(i, t) if t in top else torch.tensor(-100.0)
                torch.testing.assert_close(score_i2t[i, t], expected, rtol=1e-5, atol=1e-5)
        for t in range(7):
            top = sim[:, t].topk(3).indices.tolist()
            for i in range(5):
                expected = pair(i, t) if i in top else torch.tensor(-100.0)
                torch.testing.assert_close(score_t2i[t, i], expected, rtol=1e-5, atol=1e-5)
