"""Recall@K of image-text retrieval: hand-worked ranks, pessimistic ties, the original ``itm_eval`` on scores
without ties, chunking and the refusal of malformed inputs."""

import numpy as np
import pytest
import torch

from blip_fast.evaluation import recall
from blip_fast.evaluation.recall import recall_at_k

# 3 images, 5 captions: image 0 owns captions 0 and 1, image 1 caption 2, image 2 captions 3 and 4
IMG2TXT = [[0, 1], [2], [3, 4]]
TXT2IMG = [0, 0, 1, 2, 2]
SCORE_I2T = torch.tensor([
    [0.2, 0.9, 0.9, 0.1, 0.5],  # best gold 0.9 (caption 1), tied by non-gold caption 2: rank 1
    [0.3, 0.1, 0.8, 0.2, 0.4],  # gold 0.8 beats every other caption: rank 0
    [0.7, 0.6, 0.5, 0.1, 0.2],  # best gold 0.2 (caption 4), below captions 0, 1, 2: rank 3
])
SCORE_T2I = torch.tensor([
    [0.5, 0.5, 0.1],  # caption 0 -> image 0, tied by image 1: rank 1
    [0.9, 0.1, 0.2],  # caption 1 -> image 0: rank 0
    [0.3, 0.3, 0.3],  # caption 2 -> image 1, tied by both others: rank 2
    [0.0, 0.1, 0.4],  # caption 3 -> image 2: rank 0
    [0.6, 0.2, 0.5],  # caption 4 -> image 2, below image 0: rank 1
])


def test_hand_worked_ranks():
    metrics = recall_at_k(SCORE_I2T, SCORE_T2I, IMG2TXT, TXT2IMG, ks=(1, 2, 3))
    # image ranks 1, 0, 3: within 1 -> 1 of 3; within 2 and 3 -> 2 of 3
    # caption ranks 1, 0, 2, 0, 1: within 1 -> 2 of 5; within 2 -> 4 of 5; within 3 -> 5 of 5
    expected = {"txt_r1": 100 / 3, "txt_r2": 200 / 3, "txt_r3": 200 / 3, "img_r1": 40.0, "img_r2": 80.0,
                "img_r3": 100.0}
    expected["r_mean"] = sum(expected.values()) / 6
    expected["chance_r1"] = 100 / 3
    assert metrics == pytest.approx(expected, rel=1e-12)
    assert list(metrics) == list(expected)


def test_default_keys_are_those_of_the_evaluation_summary():
    metrics = recall_at_k(SCORE_I2T, SCORE_T2I, IMG2TXT, TXT2IMG)
    assert list(metrics) == ["txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean", "chance_r1"]


def test_a_constant_scorer_gets_nothing():
    # 12 images of one caption each, every pair the same score: each gold item ties with all 11 others, so its
    # pessimistic rank is 11, beyond K = 10; a sort-position ranking would credit whichever items the sort puts first
    images = 12
    scores = torch.zeros(images, images)
    metrics = recall_at_k(scores, scores, [[i] for i in range(images)], list(range(images)))
    assert all(metrics[key] == 0.0 for key in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10"))
    assert metrics["r_mean"] == 0.0
    assert metrics["chance_r1"] == pytest.approx(100 / 12)
    # the original's sort positions credit it for the gold items the sort happens to leave in front
    scores = scores.numpy()
    assert original_itm_eval_recall(scores, scores, [[i] for i in range(images)], list(range(images)))["txt_r10"] > 0


def test_a_tie_with_a_gold_caption_does_not_cost_a_rank():
    # gold captions 0 and 1 tie at the top: only non-gold captions push the image down
    scores = torch.tensor([[0.9, 0.9, 0.1], [0.0, 0.0, 1.0]])
    metrics = recall_at_k(scores, scores.t().contiguous(), [[0, 1], [2]], [0, 0, 1], ks=(1,))
    assert metrics["txt_r1"] == 100.0


def original_itm_eval_recall(score_i2t: np.ndarray, score_t2i: np.ndarray, img2txt, txt2img, ks=(1, 5, 10)):
    """Recall@K as the original BLIP ``itm_eval`` computes it: position in ``np.argsort(score)[::-1]``, the least
    position over an image's gold captions."""
    ranks = np.zeros(score_i2t.shape[0])
    for index, score in enumerate(score_i2t):
        inds = np.argsort(score)[::-1]
        rank = 1e20
        for i in img2txt[index]:
            tmp = np.where(inds == i)[0][0]
            if tmp < rank:
                rank = tmp
        ranks[index] = rank
    metrics = {f"txt_r{k}": 100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in ks}
    ranks = np.zeros(score_t2i.shape[0])
    for index, score in enumerate(score_t2i):
        inds = np.argsort(score)[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    metrics |= {f"img_r{k}": 100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in ks}
    return metrics


def random_retrieval_split(images: int, generator: torch.Generator):
    """1 to 5 captions per image, captions numbered in a shuffled order, scores drawn uniformly (no ties)."""
    counts = torch.randint(1, 6, (images,), generator=generator)
    owners = torch.repeat_interleave(torch.arange(images), counts)
    txt2img = owners[torch.randperm(len(owners), generator=generator)].tolist()
    img2txt = [[t for t, owner in enumerate(txt2img) if owner == i] for i in range(images)]
    score_i2t = torch.rand(images, len(txt2img), generator=generator, dtype=torch.float64)
    score_t2i = torch.rand(len(txt2img), images, generator=generator, dtype=torch.float64)
    return score_i2t, score_t2i, img2txt, txt2img


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_the_original_without_ties(seed):
    score_i2t, score_t2i, img2txt, txt2img = random_retrieval_split(40, torch.Generator().manual_seed(seed))
    assert score_i2t.unique().numel() == score_i2t.numel() and score_t2i.unique().numel() == score_t2i.numel()
    ours = recall_at_k(score_i2t, score_t2i, img2txt, txt2img)
    original = original_itm_eval_recall(score_i2t.numpy(), score_t2i.numpy(), img2txt, txt2img)
    assert {key: ours[key] for key in original} == pytest.approx(original, rel=1e-12)
    assert 0 < ours["txt_r10"] < 100 and 0 < ours["img_r10"] < 100  # the comparison is not vacuous


def test_chunks_give_the_same_result(monkeypatch):
    score_i2t, score_t2i, img2txt, txt2img = random_retrieval_split(23, torch.Generator().manual_seed(7))
    whole = recall_at_k(score_i2t, score_t2i, img2txt, txt2img, ks=(1, 3, 10))
    monkeypatch.setattr(recall, "CHUNK_ELEMENTS", 7)  # fewer than one row: one row per chunk
    assert recall_at_k(score_i2t, score_t2i, img2txt, txt2img, ks=(1, 3, 10)) == whole
    monkeypatch.setattr(recall, "CHUNK_ELEMENTS", 3 * score_i2t.shape[1] + 1)  # chunks of 3 rows, a short last one
    assert recall_at_k(score_i2t, score_t2i, img2txt, txt2img, ks=(1, 3, 10)) == whole


@pytest.mark.parametrize("override, message", [
    ({"score_i2t": SCORE_I2T.t()}, "score_i2t has shape"),
    ({"score_t2i": SCORE_T2I[:-1]}, "score_t2i has shape"),
    ({"img2txt": [[0, 1], [], [2, 3, 4]]}, "1 images have no caption"),
    ({"img2txt": [[0, 1], [2], [3, 3]]}, "img2txt lists 5 captions \\(4 distinct\\)"),
    ({"img2txt": [[0, 1], [2], [3]]}, "img2txt lists 4 captions"),
    ({"img2txt": [[0, 2], [1], [3, 4]]}, "caption 2 is listed under image 0 but txt2img gives image 1"),
    ({"img2txt": [[0, 1], [2], [3, 5]]}, "caption index outside"),
    ({"txt2img": [0, 0, 1, 2, 3]}, "txt2img must list"),
    ({"txt2img": [0, 0, 1, 2, -1]}, "txt2img must list"),
    ({"img2txt": [], "txt2img": []}, "at least one image"),
    ({"ks": (1, 0)}, "positive integers"),
    ({"ks": (1, 1.5)}, "positive integers"),
    ({"ks": (5, 5)}, "repeats"),
])
def test_malformed_inputs_are_refused(override, message):
    inputs = {"score_i2t": SCORE_I2T, "score_t2i": SCORE_T2I, "img2txt": IMG2TXT, "txt2img": TXT2IMG, "ks": (1,)}
    with pytest.raises(ValueError, match=message):
        recall_at_k(**(inputs | override))


@pytest.mark.parametrize("which", ["score_i2t", "score_t2i"])
def test_nan_scores_are_refused(which):
    inputs = {"score_i2t": SCORE_I2T.clone(), "score_t2i": SCORE_T2I.clone()}
    inputs[which][1, 2] = float("nan")
    with pytest.raises(ValueError, match=f"{which} contains NaN"):
        recall_at_k(**inputs, img2txt=IMG2TXT, txt2img=TXT2IMG)
