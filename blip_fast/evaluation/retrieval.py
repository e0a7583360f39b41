"""Image-text retrieval evaluation as the original ``evaluation`` / ``itm_eval`` of ``train_retrieval.py``.

1. ITC: every image and every caption is embedded once; ``sim = image_feat @ text_feat.T``.
2. ITM re-ranking (``itm_k > 0``): for each image its ``k`` most similar captions, and for each
   caption its ``k`` most similar images, are scored by the image-grounded encoder; a candidate's
   score is ``itm_match_logit + itc_sim`` (the original adds the two), others stay at -100.
3. Recall@K (blip_fast.evaluation.recall, ties counted against the model): an image is retrieved correctly at K
   when any of its captions is among the top K (text retrieval); a caption when its image is (image retrieval).
   ``r_mean`` averages all six.

Images of a split share the evaluation transform (bicubic resize, no crop); captions are cleaned
with the split's ``max_words`` and tokenized to at most ``max_length`` tokens (35 in the original).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.annotations import RetrievalAnnotations
from ..models.med import BlockContext
from ..text import BlipTokenizer, clean_caption
from .images import evaluation_images
from .recall import recall_at_k


@dataclass
class RetrievalResult:
    images: int
    texts: int
    itm_k: int
    metrics: dict[str, float]
    """``txt_r1, txt_r5, txt_r10`` (image -> text), ``img_r1, img_r5, img_r10`` (text -> image), ``r_mean``,
    in percent; ``chance_r1`` is the R@1 of a random ranking of the images."""

    @property
    def score(self) -> float:
        """What picks the best epoch: the mean of the six recalls (the original's ``r_mean``)."""
        return self.metrics["r_mean"]

    def summary(self) -> str:
        m = self.metrics
        how = f"ITC top-{self.itm_k} re-ranked by ITM" if self.itm_k else "ITC"
        return (f"retrieval on {self.images} images / {self.texts} captions ({how}): image->text R@1 {m['txt_r1']:.1f} "
                f"R@5 {m['txt_r5']:.1f} R@10 {m['txt_r10']:.1f}; text->image R@1 {m['img_r1']:.1f} R@5 "
                f"{m['img_r5']:.1f} R@10 {m['img_r10']:.1f} (chance R@1 {m['chance_r1']:.1f})")


@torch.no_grad()
def split_features(model, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every image's tokens (N, 1 + patches, width) and ITC feature (N, D), and every caption's ITC feature (T, D),
    in batches of ``batch_size``, on the model's device."""
    device = next(model.parameters()).device
    embeds, image_feats, text_feats = [], [], []
    for start in range(0, images.shape[0], batch_size):
        chunk = model.image_embeds(images[start:start + batch_size].to(device))
        embeds.append(chunk)
        image_feats.append(model.image_features(chunk))
    for start in range(0, input_ids.shape[0], batch_size):
        ids, mask = input_ids[start:start + batch_size].to(device), attention_mask[start:start + batch_size].to(device)
        text_feats.append(model.text_features(ids, mask))
    return torch.cat(embeds), torch.cat(image_feats), torch.cat(text_feats)


@torch.no_grad()
def retrieval_scores(model, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     itm_k: int = 0, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Score matrices ``(images, texts)`` and ``(texts, images)`` of a model with ITC features and an ITM head."""
    device = next(model.parameters()).device
    image_embeds, image_feat, text_feat = split_features(model, images, input_ids, attention_mask, batch_size)
    sim = (image_feat @ text_feat.t()).float()
    if itm_k <= 0:
        return sim.cpu(), sim.t().cpu()
    enc_ids = model.with_enc(input_ids.to(device))
    mask = attention_mask.to(device)

    def itm(image_rows: torch.Tensor, text_rows: torch.Tensor) -> torch.Tensor:
        scores = []
        for start in range(0, image_rows.shape[0], batch_size):
            i, t = image_rows[start:start + batch_size], text_rows[start:start + batch_size]
            # an image recurs in up to k pairs of a chunk: project its cross-attention keys/values once
            images, row_of = torch.unique(i, return_inverse=True)
            image_kv = [(k[row_of], v[row_of]) for k, v in model.image_keys_values(image_embeds[images])]
            logits = model.itm_logits_from_keys_values(image_kv, enc_ids[t], mask[t])
            scores.append(logits[:, 1].float())
        return torch.cat(scores)

    def itm_of_candidates(top_text: torch.Tensor) -> torch.Tensor:
        """ITM match logits (images, k) of each image with its k candidate texts ``top_text`` (images, k).

        An image's k texts attend to its keys/values stacked along the sequence (``BlockContext``): exact, as
        cross-attention has no key mask, and no image's keys/values are copied k times.
        """
        scores, k = [], top_text.shape[1]
        per_chunk = max(1, batch_size // k)
        for start in range(0, top_text.shape[0], per_chunk):
            candidates = top_text[start:start + per_chunk]  # (C, k)
            contexts = [BlockContext(((keys, values, k, None),))
                        for keys, values in model.image_keys_values(image_embeds[start:start + per_chunk])]
            texts = candidates.t().reshape(-1)  # (k * C,): block j holds every image's j-th candidate
            logits = model.itm_logits_from_keys_values(contexts, enc_ids[texts], mask[texts])[:, 1].float()
            scores.append(logits.view(k, -1).t())  # (C, k)
        return torch.cat(scores)

    k_text, k_image = min(itm_k, sim.shape[1]), min(itm_k, sim.shape[0])
    score_i2t = torch.full_like(sim, -100.0)
    top_sim, top_text = sim.topk(k_text, dim=1)
    score_i2t.scatter_(1, top_text, itm_of_candidates(top_text) + top_sim)
    score_t2i = torch.full_like(sim.t(), -100.0)
    top_sim, top_image = sim.t().topk(k_image, dim=1)
    rows = torch.arange(sim.shape[1], device=device).repeat_interleave(k_image)
    score_t2i[rows, top_image.reshape(-1)] = itm(top_image.reshape(-1), rows) + top_sim.reshape(-1)
    return score_i2t.cpu(), score_t2i.cpu()


def load_retrieval_split(annotations: RetrievalAnnotations, image_size: int, limit: int | None = None,
                         max_words: int = 30, max_length: int = 35, tokenizer: BlipTokenizer | None = None):
    """Images (N, 3, S, S), token ids and masks of the split's captions, and the gold links, for the first
    ``limit`` images. An image that cannot be read is an error here: evaluation sets are small and fixed."""
    n = len(annotations) if limit is None else min(limit, len(annotations))
    paths, texts, img2txt, txt2img = [], [], [], []
    for index in range(n):
        entry = annotations.sample(index, stats=None)
        paths.append(entry.image_path)
        img2txt.append([])
        for caption in entry.caption:
            img2txt[-1].append(len(texts))
            txt2img.append(index)
            texts.append(clean_caption(caption, max_words))
    tokens = (tokenizer or BlipTokenizer())(texts, max_length=max_length)
    return evaluation_images(paths, image_size), tokens.input_ids, tokens.attention_mask, img2txt, txt2img


def evaluate_retrieval(model, annotations: RetrievalAnnotations, image_size: int, limit: int | None = None,
                       itm_k: int = 0, batch_size: int = 64) -> RetrievalResult:
    images, ids, mask, img2txt, txt2img = load_retrieval_split(annotations, image_size, limit)
    was_training = model.training
    model.eval()
    try:
        score_i2t, score_t2i = retrieval_scores(model, images, ids, mask, itm_k, batch_size)
    finally:
        model.train(was_training)
    return RetrievalResult(len(img2txt), len(txt2img), itm_k, recall_at_k(score_i2t, score_t2i, img2txt, txt2img))
