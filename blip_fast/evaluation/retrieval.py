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

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist

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
    ranks: int = 1
    """Processes that shared the work."""

    @property
    def score(self) -> float:
        """What picks the best epoch: the mean of the six recalls (the original's ``r_mean``)."""
        return self.metrics["r_mean"]

    def summary(self) -> str:
        m = self.metrics
        how = f"ITC top-{self.itm_k} re-ranked by ITM" if self.itm_k else "ITC"
        how += f", {self.ranks} ranks" if self.ranks > 1 else ""
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


def encode_images(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-attention context (image tokens) and the ITC features of ``images``, on the model's device."""
    embeds = model.image_embeds(images.to(next(model.parameters()).device))
    return embeds, model.image_features(embeds)


class ImageTensors:
    """Images already in memory (N, 3, S, S) as a source of :func:`retrieval_scores`."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def encode(self, model, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_images(model, self.images[start:stop])


class ImageFiles:
    """Image files decoded a chunk at a time by a thread pool (Pillow releases the GIL while it decodes and
    resizes), the next chunk decoding while the model runs on this one: the split is never held in memory whole
    (COCO's 5,000 test images are 8.8 GB of fp32 pixels at 384 px)."""

    def __init__(self, paths: list[str], image_size: int, workers: int = 4):
        self.paths, self.image_size = list(paths), image_size
        self.pool = ThreadPoolExecutor(max(1, workers))
        self.ahead: tuple[int, int, list] | None = None  # (start, stop, futures) of the chunk decoding ahead

    def __len__(self) -> int:
        return len(self.paths)

    def _submit(self, start: int, stop: int) -> list:
        return [self.pool.submit(evaluation_images, [path], self.image_size) for path in self.paths[start:stop]]

    def encode(self, model, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ahead is not None and self.ahead[:2] == (start, stop):
            futures = self.ahead[2]
        else:
            if self.ahead is not None:  # another chunk was asked for: drop what has not started
                for future in self.ahead[2]:
                    future.cancel()
            futures = self._submit(start, stop)
        following = (stop, min(len(self), 2 * stop - start))
        self.ahead = (*following, self._submit(*following)) if following[0] < following[1] else None
        return encode_images(model, torch.cat([future.result() for future in futures]))


def shard(count: int, rank: int, world: int) -> range:
    """Rank ``rank``'s contiguous share of ``count`` items (the first ``count % world`` ranks one more)."""
    size, extra = divmod(count, world)
    start = rank * size + min(rank, extra)
    return range(start, start + size + (rank < extra))


def _gather_rows(rows: torch.Tensor, count: int, world: int) -> torch.Tensor:
    """Every rank's ``rows`` (its :func:`shard` of ``count``) concatenated in rank order, on every rank."""
    if world == 1:
        return rows
    width = shard(count, 0, world).stop  # the largest share: all_gather wants equal sizes
    padded = rows.new_zeros(width, *rows.shape[1:])
    padded[:rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:len(shard(count, r, world))] for r, part in enumerate(parts)])


@torch.no_grad()
def retrieval_scores(model, visual, input_ids: torch.Tensor, attention_mask: torch.Tensor, itm_k: int = 0,
                     batch_size: int = 64, distributed: bool = False,
                     context_budget: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Score matrices ``(visuals, texts)`` and ``(texts, visuals)`` of a model with ITC features and an ITM head.

    ``visual``: images (N, 3, S, S), or a source with ``len()`` and ``encode(model, start, stop)`` returning the
    cross-attention context (n, L, width) and the normalised ITC features (n, D) of items ``start:stop`` on the
    model's device (:class:`ImageTensors`, :class:`ImageFiles`, the frames of videos). ``distributed``: every rank
    of the default process group calls with the same arguments, encodes its :func:`shard` of the visuals and texts
    and re-ranks its visuals' candidate pairs; every rank returns the whole matrices. ``context_budget``: bytes the
    rank's contexts may hold on the device between the two passes (default: a quarter of the free CUDA memory, 4 GiB
    on a CPU); over it they are encoded again for the re-ranking.
    """
    if isinstance(visual, torch.Tensor):
        visual = ImageTensors(visual)
    device = next(model.parameters()).device
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed and dist.is_initialized() else (0, 1)
    count, texts = len(visual), input_ids.shape[0]
    mine = shard(count, rank, world)
    contexts, image_feat = [], []
    for start in range(mine.start, mine.stop, batch_size):
        context, features = visual.encode(model, start, min(start + batch_size, mine.stop))
        image_feat.append(features)
        if contexts is not None:
            contexts.append(context)
            if sum(c.numel() * c.element_size() for c in contexts) > _budget(device, context_budget):
                contexts = None  # encoded again, a chunk at a time, when the pairs are scored
    text_feat = []
    for start in range(shard(texts, rank, world).start, shard(texts, rank, world).stop, batch_size):
        stop = min(start + batch_size, shard(texts, rank, world).stop)
        text_feat.append(model.text_features(input_ids[start:stop].to(device), attention_mask[start:stop].to(device)))
    width = model.config.embed_dim
    image_feat = _gather_rows(torch.cat(image_feat) if image_feat else _empty(device, width, model), count, world)
    text_feat = _gather_rows(torch.cat(text_feat) if text_feat else _empty(device, width, model), texts, world)
    sim = (image_feat @ text_feat.t()).float()
    if itm_k <= 0:
        return sim.cpu(), sim.t().cpu()

    # the candidates of both directions as one list of (visual, text) pairs, each scored once, visual-major
    k_text, k_image = min(itm_k, texts), min(itm_k, count)
    top_sim_i2t, top_text = sim.topk(k_text, dim=1)
    top_sim_t2i, top_image = sim.t().topk(k_image, dim=1)
    keys = torch.cat([(torch.arange(count, device=device)[:, None] * texts + top_text).reshape(-1),
                      (top_image * texts + torch.arange(texts, device=device)[:, None]).reshape(-1)])
    pairs, position = torch.unique(keys, return_inverse=True)  # sorted: by visual, then text
    pair_scores = torch.zeros(pairs.shape[0], device=device)
    enc_ids, mask = model.with_enc(input_ids.to(device)), attention_mask.to(device)
    for start in range(mine.start, mine.stop, batch_size):
        stop = min(start + batch_size, mine.stop)
        context = contexts[(start - mine.start) // batch_size] if contexts is not None else \
            visual.encode(model, start, stop)[0]
        first, last = torch.searchsorted(pairs, torch.tensor([start * texts, stop * texts], device=device)).tolist()
        pair_scores[first:last] = _itm_of_pairs(model, context, pairs[first:last] // texts - start,
                                                pairs[first:last] % texts, enc_ids, mask, batch_size)
    if world > 1:
        dist.all_reduce(pair_scores)  # each pair was scored by the rank holding its visual, zeros elsewhere
    itm = pair_scores[position]
    score_i2t = torch.full_like(sim, -100.0)
    score_i2t.scatter_(1, top_text, itm[:count * k_text].view(count, k_text) + top_sim_i2t)
    score_t2i = torch.full_like(sim.t(), -100.0)
    score_t2i.scatter_(1, top_image, itm[count * k_text:].view(texts, k_image) + top_sim_t2i)
    return score_i2t.cpu(), score_t2i.cpu()


def _empty(device: torch.device, width: int, model) -> torch.Tensor:
    """A rank's features when its share is empty (more ranks than items)."""
    return torch.zeros(0, width, device=device, dtype=next(model.parameters()).dtype)


def _budget(device: torch.device, budget: int | None) -> int:
    if budget is not None:
        return budget
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 4
    return 4 << 30


# texts of one visual stacked into one attention row: more share a gather of the visual's keys/values, but the last
# group of each visual is padded up to this many
GROUP = 16


def _itm_of_pairs(model, context: torch.Tensor, visual: torch.Tensor, text: torch.Tensor, enc_ids: torch.Tensor,
                  mask: torch.Tensor, batch_size: int) -> torch.Tensor:
    """ITM match logits of pairs (``visual`` rows of ``context``, sorted; ``text`` rows of ``enc_ids``).

    The pairs of a visual go in groups of up to :data:`GROUP` texts; a group's texts attend to their visual's
    keys/values stacked along the sequence (``BlockContext``: exact, cross-attention has no key mask), so a visual's
    keys/values are projected once per chunk and gathered once per group, never once per pair.
    """
    pairs = visual.shape[0]
    if pairs == 0:
        return torch.zeros(0, device=context.device)
    counts = torch.bincount(visual, minlength=context.shape[0])
    group = max(1, min(GROUP, batch_size, round(pairs / max(1, int((counts > 0).sum())))))
    groups_of = (counts + group - 1) // group  # groups per visual
    first_group = torch.cumsum(groups_of, 0) - groups_of
    first_pair = torch.cumsum(counts, 0) - counts
    within = torch.arange(pairs, device=visual.device) - first_pair[visual]
    group_index = first_group[visual] + within // group
    slot = within % group
    groups = int(groups_of.sum())
    # a group's empty slots repeat its first text (scored, then dropped)
    text_of = torch.zeros(groups, group, dtype=torch.long, device=visual.device)
    text_of[:] = text[slot == 0][:, None]
    text_of[group_index, slot] = text
    pair_of = torch.full((groups, group), -1, dtype=torch.long, device=visual.device)
    pair_of[group_index, slot] = torch.arange(pairs, device=visual.device)
    visual_of = visual[slot == 0]
    keys_values = model.image_keys_values(context)
    scores = torch.empty(pairs, device=context.device)
    per_forward = max(1, batch_size // group)
    for start in range(0, groups, per_forward):
        stop = min(start + per_forward, groups)
        rows = visual_of[start:stop]
        block = [BlockContext(((keys, values, group, rows),)) for keys, values in keys_values]
        texts = text_of[start:stop].t().reshape(-1)  # block j holds slot j of every group
        logits = model.itm_logits_from_keys_values(block, enc_ids[texts], mask[texts])[:, 1].float()
        logits = logits.view(group, -1).t()  # (groups, group)
        kept = pair_of[start:stop] >= 0
        scores[pair_of[start:stop][kept]] = logits[kept]
    return scores


def load_retrieval_split(annotations: RetrievalAnnotations, image_size: int, limit: int | None = None,
                         max_words: int = 30, max_length: int = 35, tokenizer: BlipTokenizer | None = None,
                         workers: int = 4):
    """The images (:class:`ImageFiles`, decoded as they are encoded), token ids and masks of the split's captions,
    and the gold links, for the first ``limit`` images. An image that cannot be read is an error: evaluation sets
    are small and fixed."""
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
    return ImageFiles(paths, image_size, workers), tokens.input_ids, tokens.attention_mask, img2txt, txt2img


def evaluate_retrieval(model, annotations: RetrievalAnnotations, image_size: int, limit: int | None = None,
                       itm_k: int = 0, batch_size: int = 64, distributed: bool = False,
                       workers: int = 4) -> RetrievalResult:
    """Recall@K of ``model`` on the first ``limit`` images of the split; ``distributed``: every rank of the default
    process group calls, each encodes and re-ranks its share (:func:`retrieval_scores`), all get the result."""
    images, ids, mask, img2txt, txt2img = load_retrieval_split(annotations, image_size, limit, workers=workers)
    was_training = model.training
    model.eval()
    try:
        score_i2t, score_t2i = retrieval_scores(model, images, ids, mask, itm_k, batch_size, distributed)
    finally:
        model.train(was_training)
    ranks = dist.get_world_size() if distributed and dist.is_initialized() else 1
    return RetrievalResult(len(img2txt), len(txt2img), itm_k, recall_at_k(score_i2t, score_t2i, img2txt, txt2img),
                           ranks)
