"""Zero-shot video-text retrieval as the original ``eval_retrieval_video.py`` (MSRVTT, a COCO retrieval model).

A video is ``frames`` frames (:mod:`blip_fast.data.video`: the original's sampling, resize and normalisation), each
through the ViT as an image. Following the original's ``evaluation``:

1. ITC: a video's feature is ``normalize(mean over frames of vision_proj(frame [CLS] token))`` -- projected, then
   averaged, then normalised; captions are cleaned with ``pre_caption(caption, 40)`` and tokenized to 35 tokens,
   embedded as for images; ``sim = video_feat @ text_feat.T``.
2. ITM re-ranking: the image-grounded encoder cross-attends to the frames' tokens concatenated along the sequence,
   (F * (1 + patches), width) per video; the ``itm_k`` (``k_test``, 128) most similar captions of each video and
   videos of each caption score ``itm_match_logit + itc_sim``, every other pair -100. The re-ranking is the image
   evaluation's (:func:`~blip_fast.evaluation.retrieval.retrieval_scores`) with :class:`VideoSource` as its visual
   source.
3. The original's ``itm_eval``: ``txt_r1/5/10`` (video -> text) and ``vid_r1/5/10`` (text -> video), their means
   ``txt_r_mean`` and ``vid_r_mean``, ``r_mean`` the mean of those two, and ``vid_mdR``, the median 1-based rank
   of the right video for a caption. Ranks count ties against the model (:mod:`blip_fast.evaluation.recall`); the
   original's sort positions agree wherever nothing ties with the right item.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.video import VideoAnnotations, VideoFrames
from ..text import BlipTokenizer, clean_caption
from .recall import recall_at_k
from .retrieval import retrieval_scores

MAX_WORDS = 40      # the original's pre_caption(ann['caption'], 40)
MAX_LENGTH = 35     # tokenizer(..., max_length=35)


@dataclass
class VideoRetrievalResult:
    videos: int
    texts: int
    frames: int
    itm_k: int
    decoder: str
    metrics: dict[str, float]
    """The original's ``itm_eval`` keys: ``txt_r1, txt_r5, txt_r10, txt_r_mean`` (video -> text), ``vid_r1, vid_r5,
    vid_r10, vid_r_mean`` (text -> video), ``vid_mdR`` (median rank, 1-based), ``r_mean``; recalls in percent.
    ``chance_r1`` is the R@1 of a random ranking of the videos."""

    @property
    def score(self) -> float:
        """The mean of the six recalls (the original's ``r_mean``)."""
        return self.metrics["r_mean"]

    def summary(self) -> str:
        m = self.metrics
        how = f"ITC top-{self.itm_k} re-ranked by ITM" if self.itm_k else "ITC"
        return (f"video retrieval on {self.videos} videos / {self.texts} captions ({self.frames} frames, {how}, "
                f"{self.decoder}): text->video R@1 {m['vid_r1']:.1f} R@5 {m['vid_r5']:.1f} R@10 {m['vid_r10']:.1f} "
                f"MdR {m['vid_mdR']:g}; video->text R@1 {m['txt_r1']:.1f} R@5 {m['txt_r5']:.1f} R@10 "
                f"{m['txt_r10']:.1f} (chance R@1 {m['chance_r1']:.1f})")


def video_recall(score_v2t: torch.Tensor, score_t2v: torch.Tensor) -> dict[str, float]:
    """The original ``itm_eval`` of (videos, texts) and (texts, videos) score matrices, caption ``i`` describing
    video ``i`` (one caption a video); ties count against the model."""
    score_v2t, score_t2v = torch.as_tensor(score_v2t).cpu(), torch.as_tensor(score_t2v).cpu()
    videos = score_v2t.shape[0]
    pairs = list(range(videos))
    r = recall_at_k(score_v2t, score_t2v, [[i] for i in pairs], pairs)
    # the right video's rank for each caption: the other videos scoring at least as high (recall.py's rule)
    gold = score_t2v.gather(1, torch.arange(videos)[:, None])
    ranks = (score_t2v >= gold).sum(dim=1) - 1
    metrics = {f"txt_r{k}": r[f"txt_r{k}"] for k in (1, 5, 10)}
    metrics["txt_r_mean"] = sum(metrics.values()) / 3
    metrics |= {f"vid_r{k}": r[f"img_r{k}"] for k in (1, 5, 10)}
    metrics["vid_r_mean"] = (metrics["vid_r1"] + metrics["vid_r5"] + metrics["vid_r10"]) / 3
    metrics["vid_mdR"] = float(np.median(ranks.numpy() + 1))  # an even count averages the middle two, as NumPy's
    metrics["r_mean"] = (metrics["txt_r_mean"] + metrics["vid_r_mean"]) / 2
    metrics["chance_r1"] = r["chance_r1"]
    return metrics


class VideoSource:
    """Video files as a visual source of :func:`~blip_fast.evaluation.retrieval.retrieval_scores`.

    ``encode(model, start, stop)`` decodes videos ``start:stop`` (``frames`` frames each, through ``reader``),
    runs every frame through the ViT and returns the cross-attention context (n, frames * tokens, width), each
    video's frames' tokens one after another, and the normalised video ITC features (n, D). The next chunk is
    decoded on a background thread while the model runs on this one.
    """

    def __init__(self, paths: list[str | Path], reader: VideoFrames):
        self.paths = [Path(path) for path in paths]
        self.reader = reader
        self.pool = ThreadPoolExecutor(1)
        self.ahead: tuple[int, int, Future] | None = None  # (start, stop, decoding) of the chunk read ahead

    def __len__(self) -> int:
        return len(self.paths)

    def videos(self, start: int, stop: int) -> torch.Tensor:
        """Videos ``start:stop`` (n, frames, 3, S, S), reading the following chunk ahead."""
        if self.ahead is not None and self.ahead[:2] == (start, stop):
            decoding = self.ahead[2]
        else:
            if self.ahead is not None:  # another chunk was asked for: drop it if it has not started
                self.ahead[2].cancel()
            decoding = self.pool.submit(self.reader.read_many, self.paths[start:stop])
        following = (stop, min(len(self), 2 * stop - start))
        self.ahead = None
        if following[0] < following[1]:
            self.ahead = (*following, self.pool.submit(self.reader.read_many, self.paths[slice(*following)]))
        return decoding.result()

    def encode(self, model, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(model.parameters()).device
        video = self.videos(start, stop).to(device)
        n, frames = video.shape[:2]
        embeds = model.image_embeds(video.flatten(0, 1))                             # (n * F, L, width)
        features = model.vision_proj(embeds[:, 0, :]).view(n, frames, -1).mean(dim=1)  # (n, D)
        context = embeds.view(n, frames * embeds.shape[1], embeds.shape[2])          # (n, F * L, width)
        return context, F.normalize(features, dim=-1)


def load_video_split(annotations: VideoAnnotations, limit: int | None = None,
                     tokenizer: BlipTokenizer | None = None):
    """The video paths, token ids and masks of the first ``limit`` entries' captions (cleaned as the original)."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    entries = annotations.entries[:limit]
    texts = [clean_caption(entry.caption, MAX_WORDS) for entry in entries]
    empty = [entry.clip_name for entry, text in zip(entries, texts, strict=True) if not text]
    if empty:
        raise ValueError(f"{annotations.path}: the caption of {empty[0]} is empty once cleaned")
    tokens = (tokenizer or BlipTokenizer())(texts, max_length=MAX_LENGTH)
    return [entry.path for entry in entries], tokens.input_ids, tokens.attention_mask


def evaluate_video_retrieval(model, annotations: VideoAnnotations, image_size: int, frames: int = 8,
                             itm_k: int = 128, batch_size: int = 64, limit: int | None = None,
                             decoder: str = "auto", workers: int = 4,
                             distributed: bool = False) -> VideoRetrievalResult:
    """The original's zero-shot video retrieval of ``model`` on the first ``limit`` videos of ``annotations``.

    ``batch_size`` videos (``batch_size * frames`` frames) go through the ViT at once; ``decoder``: ``auto``,
    ``dali`` or ``cpu`` (:class:`~blip_fast.data.video.VideoFrames`); ``distributed``: every rank of the default
    process group calls, each encodes and re-ranks its share of the videos.
    """
    if itm_k < 0:
        raise ValueError(f"--k must be at least 0 (0: ITC only), got {itm_k}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    paths, ids, mask = load_video_split(annotations, limit)
    device = next(model.parameters()).device
    reader = VideoFrames(image_size, frames, decoder, device, batch_size=batch_size, workers=workers)
    was_training = model.training
    model.eval()
    try:
        score_v2t, score_t2v = retrieval_scores(model, VideoSource(paths, reader), ids, mask, itm_k, batch_size,
                                                distributed)
    finally:
        model.train(was_training)
    return VideoRetrievalResult(len(paths), len(paths), frames, itm_k, reader.backend,
                                video_recall(score_v2t, score_t2v))
