"""Caption evaluation as the original ``evaluate`` of ``train_caption.py``, then ``coco_caption_eval``.

Every image of the split gets one caption by beam search (3 beams, 5 to 20 tokens with the prompt, repetition
penalty 1.0: the original's ``caption_coco.yaml``), from the prompt ("a picture of "), whose characters the decoded
text loses. The captions are scored against the split's reference captions with the COCO caption metrics
(blip_fast.evaluation.caption_metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE where installed). The original picks
its best epoch by CIDEr + BLEU-4 on the validation split (:attr:`CaptionResult.score`).

The split is a Karpathy-shape list (``[{"image": path, "caption": [references]}]``, ``coco_karpathy_val.json``), read
by :class:`~blip_fast.data.annotations.RetrievalAnnotations`; images through the evaluation transform.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..data.annotations import RetrievalAnnotations
from ..models.generation import GenerationConfig
from ..text import BlipTokenizer
from .images import evaluation_images

# the original caption_coco.yaml: num_beams 3, max_length 20, min_length 5
EVAL_GENERATION = GenerationConfig(strategy="beam", num_beams=3, max_length=20, min_length=5)


@dataclass
class CaptionResult:
    images: int
    metrics: dict[str, float]
    """``Bleu_1`` .. ``Bleu_4``, ``METEOR``, ``ROUGE_L``, ``CIDEr`` (and ``SPICE``), COCO's names and scales."""
    notices: list[str] = field(default_factory=list)
    """What the metrics skipped (SPICE without its jars, METEOR without Java)."""
    captions: dict[str, str] = field(default_factory=dict)
    """Each image's generated caption, by image path."""

    @property
    def score(self) -> float:
        """What picks the best epoch, as the original: CIDEr + BLEU-4."""
        return self.metrics["CIDEr"] + self.metrics["Bleu_4"]

    def summary(self) -> str:
        m = self.metrics
        shown = ", ".join(f"{name} {m[name]:.3f}" for name in ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
                          if name in m)
        return f"captioning on {self.images} images: {shown}" + "".join(f"; {n}" for n in self.notices)


@torch.no_grad()
def caption_images(model, paths: Sequence[str], image_size: int, generation: GenerationConfig = EVAL_GENERATION,
                   batch_size: int = 32, tokenizer: BlipTokenizer | None = None) -> list[str]:
    """One caption per path, in order, by ``model`` (a :class:`~blip_fast.models.BlipCaption`) in eval mode,
    ``batch_size`` images a forward through the evaluation transform. The evaluation loop of the original's
    ``train_caption.py`` and ``eval_nocaps.py``; an unreadable image is a ValueError."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}")
    tokenizer = tokenizer or BlipTokenizer()
    model.prompt_ids(tokenizer, generation)  # a generation config without room for a caption: before any work
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # dropout would make the beams random
    try:
        captions = []
        for start in range(0, len(paths), batch_size):
            batch = list(paths[start:start + batch_size])
            captions += model.captions(evaluation_images(batch, image_size).to(device), generation, tokenizer)
    finally:
        model.train(was_training)
    return captions


def evaluate_captioning(model, annotations: RetrievalAnnotations, image_size: int, limit: int | None = None,
                        generation: GenerationConfig = EVAL_GENERATION, batch_size: int = 32, java: bool = True,
                        tokenizer: BlipTokenizer | None = None) -> CaptionResult:
    """Caption the first ``limit`` images of the split with ``model`` (a :class:`~blip_fast.models.BlipCaption`) and
    score them. An image that cannot be read is an error: evaluation sets are small and fixed. ``java=False``:
    tokenized in Python, no METEOR or SPICE (blip_fast.evaluation.caption_metrics)."""
    from .caption_metrics import caption_metrics, require_java  # needs pycocoevalcap, an optional dependency

    if java:
        require_java()  # before captioning every image, not after

    count = len(annotations) if limit is None else min(limit, len(annotations))
    entries = [annotations.sample(index, stats=None) for index in range(count)]
    paths = [entry.image_path for entry in entries]
    references = {entry.image_path: entry.caption for entry in entries}
    captions = dict(zip(paths, caption_images(model, paths, image_size, generation, batch_size, tokenizer),
                        strict=True))
    metrics = caption_metrics(references, captions, java=java)
    return CaptionResult(count, metrics.scores, list(metrics.notices), captions)
