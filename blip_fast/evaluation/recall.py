"""Recall@K of image-text retrieval, with ties ranked pessimistically.

A query's **rank** is the number of wrong candidates that score at least as high as its gold one:

* text -> image (``img_r*``): the number of OTHER images whose score is >= the gold image's;
* image -> text (``txt_r*``): an image has several gold captions and is retrieved as soon as any of
  them is; its rank is the number of NON-gold captions whose score is >= the best gold caption's.

A query counts as retrieved at K when its rank is < K. Ranking by ``>=`` puts the gold item behind
every candidate it ties with, so a tie never helps: a model that cannot tell candidates apart (every
pair the same score) ranks every gold item last and gets 0 at every K below the number of
candidates, never more than chance (``chance_r1`` is what a random ranking would get at R@1).

The original BLIP ``itm_eval`` ranks by position in a sort instead (``np.argsort(score)[::-1]``, then
the least position of a gold item): ties fall in whatever order the sort leaves equal scores, so a
constant scorer is credited for every query whose gold item happens to be indexed where the sort
puts it first (with suitably indexed gold items, for every query). Where no wrong candidate ties
with a gold item, the number of candidates scoring >= the (best) gold item is exactly its position
in the sorted order, and the two give the same recall.

The rank is a comparison count over a score row, so there is no sort and no loop per query: rows are
processed in chunks of at most ``CHUNK_ELEMENTS`` scores, which bounds the temporary memory (COCO's
5k images x 25k captions are 125M scores per direction).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

CHUNK_ELEMENTS = 1 << 24
"""Scores compared per step: the step's temporaries (boolean masks, one masked copy of the scores) stay near 100 MiB
for float32 scores, whatever the size of the split."""


def recall_at_k(score_i2t: torch.Tensor, score_t2i: torch.Tensor, img2txt: Sequence[Sequence[int]],
                txt2img: Sequence[int], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K in percent of (images, texts) and (texts, images) score matrices.

    ``img2txt[i]`` lists the captions of image ``i`` and ``txt2img[t]`` the image of caption ``t``; the
    two must describe the same pairing, and every image needs at least one caption. Returns
    ``txt_r{k}`` (image -> text) and ``img_r{k}`` (text -> image) for each ``k`` in ``ks``, ``r_mean``
    (their mean) and ``chance_r1`` (100 / number of images). NaN scores are refused.
    """
    ks = _check_ks(ks)
    score_i2t, score_t2i = torch.as_tensor(score_i2t), torch.as_tensor(score_t2i)
    gold_image = _check_pairing(img2txt, txt2img)
    images, texts = len(img2txt), len(txt2img)
    for name, scores, shape in (("score_i2t", score_i2t, (images, texts)), ("score_t2i", score_t2i, (texts, images))):
        if tuple(scores.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(scores.shape)}, but img2txt/txt2img describe {images} images "
                             f"and {texts} captions: expected {shape}")
        if scores.is_floating_point() and bool(scores.isnan().any()):
            raise ValueError(f"{name} contains NaN scores: a NaN compares false with everything and has no rank")
    ranks_i2t = _image_to_text_ranks(score_i2t, gold_image.to(score_i2t.device))
    ranks_t2i = _text_to_image_ranks(score_t2i, gold_image.to(score_t2i.device))
    metrics = {f"txt_r{k}": 100.0 * int((ranks_i2t < k).sum()) / images for k in ks}
    metrics |= {f"img_r{k}": 100.0 * int((ranks_t2i < k).sum()) / texts for k in ks}
    metrics["r_mean"] = sum(metrics.values()) / len(metrics)
    metrics["chance_r1"] = 100.0 / images
    return metrics


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"ks repeats a value: {ks!r}")
    return ks


def _check_pairing(img2txt: Sequence[Sequence[int]], txt2img: Sequence[int]) -> torch.Tensor:
    """``txt2img`` as a tensor, once it is checked to be the inverse of ``img2txt``."""
    images, texts = len(img2txt), len(txt2img)
    if images == 0 or texts == 0:
        raise ValueError(f"retrieval needs at least one image and one caption, got {images} and {texts}")
    empty = [i for i, captions in enumerate(img2txt) if len(captions) == 0]
    if empty:
        raise ValueError(f"{len(empty)} images have no caption in img2txt (first: image {empty[0]})")
    gold_image = torch.as_tensor(txt2img, dtype=torch.long)
    if gold_image.ndim != 1 or bool(((gold_image < 0) | (gold_image >= images)).any()):
        raise ValueError(f"txt2img must list one image index in [0, {images}) per caption")
    listed = torch.cat([torch.as_tensor(captions, dtype=torch.long).reshape(-1) for captions in img2txt])
    owner = torch.repeat_interleave(torch.arange(images), torch.tensor([len(c) for c in img2txt]))
    if bool(((listed < 0) | (listed >= texts)).any()):
        raise ValueError(f"img2txt lists a caption index outside [0, {texts})")
    # every listed caption points back to its image, and there are as many distinct listings as captions:
    # then each caption is listed exactly once, under the image txt2img gives it
    wrong = (gold_image[listed] != owner).nonzero().flatten()
    if len(wrong):
        caption, image = int(listed[wrong[0]]), int(owner[wrong[0]])
        raise ValueError(f"img2txt and txt2img do not describe the same pairing: caption {caption} is listed under "
                         f"image {image} but txt2img gives image {int(gold_image[caption])}")
    distinct = listed.unique().numel()
    if listed.numel() != texts or distinct != texts:
        raise ValueError(f"img2txt and txt2img do not describe the same pairing: img2txt lists {listed.numel()} "
                         f"captions ({distinct} distinct) for {texts} in txt2img")
    return gold_image


def _row_chunks(rows: int, columns: int):
    step = max(1, CHUNK_ELEMENTS // max(1, columns))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _text_to_image_ranks(score_t2i: torch.Tensor, gold_image: torch.Tensor) -> torch.Tensor:
    """Per caption: the number of other images scoring >= its image."""
    ranks = []
    for start, end in _row_chunks(*score_t2i.shape):
        scores = score_t2i[start:end]
        gold = scores.gather(1, gold_image[start:end, None])
        ranks.append((scores >= gold).sum(dim=1) - 1)  # the gold image itself is counted once
    return torch.cat(ranks)


def _image_to_text_ranks(score_i2t: torch.Tensor, gold_image: torch.Tensor) -> torch.Tensor:
    """Per image: the number of non-gold captions scoring >= its best gold caption."""
    ranks = []
    for start, end in _row_chunks(*score_i2t.shape):
        scores = score_i2t[start:end]
        is_gold = gold_image[None, :] == torch.arange(start, end, device=scores.device)[:, None]
        # non-gold entries replaced by the row's minimum, which no gold score is below: the max is the best gold's
        row_min = scores.amin(dim=1, keepdim=True)
        best_gold = torch.where(is_gold, scores, row_min).amax(dim=1, keepdim=True)
        ranks.append(((scores >= best_gold) & ~is_gold).sum(dim=1))
    return torch.cat(ranks)
