"""NLVR2 evaluation as the original ``evaluate`` of ``train_nlvr.py``: is each statement true of its pair of images?

The split is read by :class:`~blip_fast.data.annotations.NlvrAnnotations` (``[{"images": [path0, path1],
"sentence": str, "label": "True" | "False"}]``). Each statement is cleaned as the original ``pre_caption(sentence,
40)`` and tokenized padded to the longest of its batch; both images go through the evaluation transform (bicubic
resize, no crop). The prediction is the larger of :meth:`~blip_fast.models.blip_nlvr.BlipNLVR.logits`' two, and the
accuracy the share of statements whose label it is, in percent.

One difference: the original's dataset swaps the pair (and "left" and "right" in the statement) at random half the
time on its evaluation splits too, so its accuracy varies from run to run; here every pair is read as the file
gives it, and the accuracy is a function of the model and the split. Evaluation ground truth must not change
silently: an entry the source refuses (not two image paths, no words, a label other than "True" or "False") or an
unreadable image is an error, not a skip.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.annotations import NlvrAnnotations
from ..data.sample import BadSample
from ..text import BlipTokenizer, clean_caption
from .images import evaluation_images

MAX_WORDS = 40  # the original nlvr_dataset's pre_caption(sentence, 40)


@dataclass
class NlvrResult:
    pairs: int
    predictions: list[int]
    """Predicted label of each statement in the split's order: 1 true, 0 false."""
    metrics: dict[str, float]
    """``accuracy`` in percent, and ``majority_class``: the accuracy of always answering the split's more frequent
    label (what a model that ignores the images and the statement can reach)."""

    @property
    def score(self) -> float:
        """What picks the best epoch: the accuracy."""
        return self.metrics["accuracy"]

    def summary(self) -> str:
        return (f"NLVR2 on {self.pairs} statements: accuracy {self.metrics['accuracy']:.2f} "
                f"(majority class {self.metrics['majority_class']:.2f})")


@dataclass
class NlvrStatement:
    """One evaluation statement: its pair of image paths, its cleaned text and its label (1 true, 0 false)."""

    first_image: str
    second_image: str
    sentence: str
    label: int


def read_nlvr_statements(annotations: NlvrAnnotations, limit: int | None = None) -> list[NlvrStatement]:
    """The first ``limit`` statements of the split; an entry the source refuses is a ValueError."""
    n = len(annotations) if limit is None else min(limit, len(annotations))
    if n < 1:
        raise ValueError("no NLVR2 statements to evaluate")
    statements = []
    for index in range(n):
        try:
            sample = annotations.sample(index, stats=None)
        except BadSample as error:
            raise ValueError(f"evaluation statement {index}: {error}") from None
        extra = sample.extra
        statements.append(NlvrStatement(sample.image_path, extra["second_image"],
                                        clean_caption(extra["sentence"], MAX_WORDS), extra["label"]))
    return statements


@torch.no_grad()
def nlvr_predictions(model, statements: list[NlvrStatement], image_size: int, batch_size: int = 64) -> list[int]:
    """The model's label of each statement (1 true, 0 false)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}")
    tokenizer = BlipTokenizer()
    parameter = next(model.parameters())
    predictions = []
    for first in range(0, len(statements), batch_size):
        batch = statements[first:first + batch_size]
        # every pair's first image, then every pair's second image, as BlipNLVR.logits takes them
        paths = [s.first_image for s in batch] + [s.second_image for s in batch]
        images = evaluation_images(paths, image_size).to(parameter.device, parameter.dtype)
        # the original pads to the longest and does not truncate: the model's positions are the only limit
        text = tokenizer([s.sentence for s in batch], max_length=model.config.text.max_position_embeddings)
        logits = model.logits(images, text.input_ids.to(parameter.device), text.attention_mask.to(parameter.device))
        predictions += logits.argmax(dim=1).tolist()
    return predictions


def evaluate_nlvr(model, annotations: NlvrAnnotations, image_size: int, batch_size: int = 64,
                  limit: int | None = None) -> NlvrResult:
    """Accuracy of ``model`` (a :class:`~blip_fast.models.blip_nlvr.BlipNLVR`) on the first ``limit`` statements of
    ``annotations`` (see the module docstring)."""
    statements = read_nlvr_statements(annotations, limit)
    was_training = model.training
    model.eval()
    try:
        predictions = nlvr_predictions(model, statements, image_size, batch_size)
    finally:
        model.train(was_training)
    labels = [s.label for s in statements]
    correct = sum(p == label for p, label in zip(predictions, labels, strict=True))
    true = sum(labels)
    metrics = {"accuracy": 100.0 * correct / len(labels),
               "majority_class": 100.0 * max(true, len(labels) - true) / len(labels)}
    return NlvrResult(len(statements), predictions, metrics)
