"""NoCaps evaluation as the original ``eval_nocaps.py``: captions for the submission file, scored locally per domain
when the public validation references are given.

**Images.** ``nocaps_val.json`` / ``nocaps_test.json`` (the original's ``nocaps_eval`` dataset) list
``[{"image": path relative to the image root, "img_id": int}]``; ``img_id`` is the NoCaps image id the server
knows. Each image goes through the evaluation transform (bicubic resize, no crop) at the checkpoint's size
(``nocaps.yaml``: 384 px).

**Captions.** Beam search as ``eval_nocaps.py`` calls ``BLIP_Decoder.generate``: 3 beams, 5 to 20 tokens counting the
prompt "a picture of " (``nocaps.yaml``), and a repetition penalty of 1.1, which ``eval_nocaps.py`` passes and the
COCO caption evaluation does not (:data:`NOCAPS_GENERATION`, :data:`~.captioning.EVAL_GENERATION` otherwise).

**Submission.** ``[{"image_id": int, "caption": str}]`` in the annotation file's order
(:meth:`NocapsResult.write_submission`), the file the NoCaps server on EvalAI (challenge 355) scores; the original
computes no metric itself. The server expects every image of the split (4,500 for validation, 10,600 for test).

**Local scores.** The validation references are public (``nocaps_val_4500_captions.json``, COCO caption format:
``images`` with ``id``, ``file_name`` and ``domain``, ``annotations`` with ``image_id`` and ``caption``, ten per
image). Given them, the captions are scored as the server reports them: per domain (``in-domain``, ``near-domain``,
``out-domain``) and over the ``entire`` split, each a corpus of its own for the COCO caption metrics
(blip_fast.evaluation.caption_metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE where installed), so that a domain's
CIDEr weighs n-grams by their document frequency among that domain's references. The server's headline numbers are
CIDEr and SPICE; it names BLEU-n ``B1`` .. ``B4`` and ROUGE-L ``ROUGE-L``, the metrics here keep COCO's names.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..checkpoint.io import atomic_write
from ..data.annotations import load_json, load_json_list
from ..models.generation import GenerationConfig
from ..text import BlipTokenizer
from .captioning import EVAL_GENERATION, caption_images

# eval_nocaps.py: nocaps.yaml's beams and lengths (those of caption_coco.yaml) and repetition_penalty=1.1
NOCAPS_GENERATION = replace(EVAL_GENERATION, repetition_penalty=1.1)
DOMAINS = ("in-domain", "near-domain", "out-domain")
ENTIRE = "entire"


@dataclass(frozen=True)
class NocapsImage:
    image_id: int
    """The NoCaps image id (the annotation's ``img_id``), the submission's ``image_id``."""
    path: str
    """The image file: the annotation's ``image`` joined to the image root."""


@dataclass(frozen=True)
class NocapsReferences:
    captions: dict[int, list[str]]
    """Image id -> its reference captions."""
    domains: dict[int, str]
    """Image id -> ``in-domain``, ``near-domain`` or ``out-domain``."""


@dataclass
class NocapsResult:
    images: int
    metrics: dict[str, dict[str, float]]
    """``in-domain``, ``near-domain``, ``out-domain`` (those with images) and ``entire`` -> ``Bleu_1`` .. ``Bleu_4``,
    ``METEOR``, ``ROUGE_L``, ``CIDEr`` (and ``SPICE``), COCO's names and scales; empty without references."""
    notices: list[str] = field(default_factory=list)
    """What the metrics skipped, and why the numbers may differ from the server's."""
    captions: dict[int, str] = field(default_factory=dict)
    """Each image's generated caption, by NoCaps image id, in the annotation file's order."""

    @property
    def score(self) -> float:
        """The headline number: CIDEr over the entire split."""
        if not self.metrics:
            raise ValueError("these NoCaps captions were not scored (no references): there is no CIDEr to compare")
        return self.metrics[ENTIRE]["CIDEr"]

    def summary(self) -> str:
        if not self.metrics:
            text = f"NoCaps on {self.images} images: captions only (no references; the EvalAI server scores them)"
        else:
            parts = []
            for domain, scores in self.metrics.items():
                shown = ", ".join(f"{name} {scores[name]:.3f}" for name in ("CIDEr", "SPICE", "Bleu_4", "METEOR")
                                  if name in scores)
                parts.append(f"{domain} {shown}")
            text = f"NoCaps on {self.images} images: " + "; ".join(parts)
        return text + "".join(f"; {notice}" for notice in self.notices)

    def write_submission(self, path: str | Path) -> Path:
        """The captions as the NoCaps server's submission file, ``[{"image_id": int, "caption": str}]``; the file
        appears complete or not at all."""
        return write_nocaps_submission(path, self.captions)


def read_nocaps_images(path: str | Path, image_root: str | Path | None = None,
                       limit: int | None = None) -> list[NocapsImage]:
    """The first ``limit`` images of a NoCaps annotation file, ``[{"image": path, "img_id": int}]``, checked: a
    malformed entry or an id given twice is a ValueError naming the file and the entry."""
    entries = load_json_list(path)
    count = len(entries) if limit is None else min(limit, len(entries))
    if count < 1:
        raise ValueError(f"{path}: no images to caption" + (f" (limit {limit})" if limit is not None else ""))
    images, seen = [], {}
    for index, entry in enumerate(entries[:count]):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: entry {index} is {type(entry).__name__}, not an object")
        image = entry.get("image")
        if not isinstance(image, str) or not image:
            raise ValueError(f"{path}: entry {index} has no image path (\"image\")")
        image_id = _image_id(entry.get("img_id"))
        if image_id is None:
            raise ValueError(f"{path}: entry {index}: img_id must be an integer (the NoCaps image id); got "
                             f"{entry.get('img_id')!r}"[:300])
        if image_id in seen:
            raise ValueError(f"{path}: img_id {image_id} is given twice (entries {seen[image_id]} and {index})")
        seen[image_id] = index
        images.append(NocapsImage(image_id, str(Path(image_root) / image) if image_root is not None else image))
    return images


def _image_id(value) -> int | None:
    # the original reads int(ann['img_id']): an int or its decimal string; a bool or a float would pass int() as an
    # id the server does not know
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdecimal():
        return int(value)
    return None


def read_nocaps_references(path: str | Path) -> NocapsReferences:
    """The reference captions and domains of a NoCaps file in COCO caption format (``nocaps_val_4500_captions.json``),
    checked: an image without a known domain or without captions, a caption of an unknown image, or an id given twice
    is a ValueError naming the file."""
    path = Path(path)
    data = load_json(path, "NoCaps references")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
            data.get("annotations"), list):
        raise ValueError(f"{path}: NoCaps references are a COCO caption file, an object with \"images\" and "
                         f"\"annotations\" lists (nocaps_val_4500_captions.json; the test split has no references)")
    domains: dict[int, str] = {}
    for index, image in enumerate(data["images"]):
        image_id = image.get("id") if isinstance(image, dict) else None
        if isinstance(image_id, bool) or not isinstance(image_id, int):
            raise ValueError(f"{path}: images[{index}] has no integer \"id\"")
        if image_id in domains:
            raise ValueError(f"{path}: image id {image_id} is listed twice")
        domain = image.get("domain")
        if domain not in DOMAINS:
            raise ValueError(f"{path}: image {image_id} has domain {domain!r}; NoCaps images are "
                             f"{', '.join(DOMAINS)}"[:300])
        domains[image_id] = domain
    captions: dict[int, list[str]] = {image_id: [] for image_id in domains}
    for index, annotation in enumerate(data["annotations"]):
        image_id = annotation.get("image_id") if isinstance(annotation, dict) else None
        caption = annotation.get("caption") if isinstance(annotation, dict) else None
        if isinstance(image_id, bool) or image_id not in captions:
            raise ValueError(f"{path}: annotations[{index}] is about image {image_id!r}, which \"images\" does not "
                             f"list"[:300])
        if not isinstance(caption, str):
            raise ValueError(f"{path}: annotations[{index}] has no caption string")
        captions[image_id].append(caption)
    bare = [image_id for image_id, texts in captions.items() if not texts]
    if bare:
        raise ValueError(f"{path}: {len(bare)} images have no reference caption (first {bare[:3]})")
    return NocapsReferences(captions, domains)


def nocaps_metrics(references: NocapsReferences, captions: Mapping[int, str],
                   java: bool = True) -> tuple[dict[str, dict[str, float]], list[str]]:
    """The COCO caption metrics of ``captions`` (image id -> caption) per NoCaps domain that has images, then over
    all of them (``entire``), each domain a corpus of its own; and the notices of the metrics (what was skipped)
    and of a partial split. ``java=False``: tokenized in Python, no METEOR or SPICE."""
    from .caption_metrics import caption_metrics  # needs pycocoevalcap, an optional dependency

    if not captions:
        raise ValueError("no NoCaps captions to score")
    _check_referenced(references, list(captions))
    metrics, notices = {}, []
    for domain in (*DOMAINS, ENTIRE):
        ids = [i for i in captions if domain == ENTIRE or references.domains[i] == domain]
        if not ids:
            notices.append(f"no {domain} images")
            continue
        scored = caption_metrics({i: references.captions[i] for i in ids}, {i: captions[i] for i in ids}, java=java)
        metrics[domain] = scored.scores
    notices += scored.notices  # the entire split's, the same as each domain's
    if len(captions) < len(references.captions):
        notices.append(f"{len(captions)} of the references' {len(references.captions)} images scored: not the "
                       f"server's numbers")
    return metrics, notices


def _check_referenced(references: NocapsReferences, image_ids: list[int]) -> None:
    unknown = [image_id for image_id in image_ids if image_id not in references.captions]
    if unknown:
        raise ValueError(f"{len(unknown)} of the {len(image_ids)} images have no references (first ids "
                         f"{unknown[:3]}): the references must be those of the annotation file's split "
                         f"(nocaps_val_4500_captions.json goes with nocaps_val.json)")


def write_nocaps_submission(path: str | Path, captions: Mapping[int, str]) -> Path:
    """Write ``captions`` (image id -> caption) as the NoCaps server's submission file, ``[{"image_id": int,
    "caption": str}]``, in their order; the file appears complete or not at all."""
    entries = []
    for image_id, caption in captions.items():
        if isinstance(image_id, bool) or not isinstance(image_id, int) or not isinstance(caption, str):
            raise ValueError(f"a NoCaps caption is an int image id and a str caption, got {image_id!r}: {caption!r}")
        entries.append({"image_id": image_id, "caption": caption})
    text = json.dumps(entries)
    return atomic_write(path, lambda temp: Path(temp).write_text(text, encoding="utf-8"))


@torch.no_grad()
def evaluate_nocaps(model, images: list[NocapsImage], image_size: int, references: NocapsReferences | None = None,
                    generation: GenerationConfig = NOCAPS_GENERATION, batch_size: int = 32, java: bool = True,
                    submission: str | Path | None = None, tokenizer: BlipTokenizer | None = None) -> NocapsResult:
    """Caption ``images`` (:func:`read_nocaps_images`) with ``model`` (a :class:`~blip_fast.models.BlipCaption`),
    write them to ``submission`` when given, and, given ``references`` (:func:`read_nocaps_references`), score them
    per domain. What would make the scoring fail (images without references, no Java) is refused before any caption
    is made, and the submission is written before the scoring: captioning the split is the long part."""
    if references is not None:
        _check_referenced(references, [image.image_id for image in images])
        if java:
            from .caption_metrics import require_java  # pycocoevalcap: an optional dependency

            require_java()
    texts = caption_images(model, [image.path for image in images], image_size, generation, batch_size, tokenizer)
    result = NocapsResult(len(images), {}, [], {image.image_id: text for image, text in zip(images, texts,
                                                                                             strict=True)})
    if submission is not None:
        result.write_submission(submission)
    if references is not None:
        result.metrics, result.notices = nocaps_metrics(references, result.captions, java=java)
    return result
