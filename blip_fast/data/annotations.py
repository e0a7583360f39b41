"""The JSON annotation files BLIP is trained and evaluated on, as indexed sample sources.

Four shapes, as the original ``data/*_dataset.py`` read them:

* **Caption lists** -- ``[{"image": path, "caption": str | [str], ...}]``: the pretraining files
  (``pretrain_dataset``: one caption or a list per image) and the training splits of COCO and
  Flickr30k in the Karpathy split (``coco_karpathy_train.json``, ``flickr30k_train.json``: one
  entry per caption with an ``image_id``). As ``coco_karpathy_train`` does, every distinct
  ``image_id`` gets a consecutive integer in order of first appearance (``extra["img_id"]``), the
  id the ITC loss uses to treat captions of the same image as positives.
* **Retrieval evaluation** -- ``coco_karpathy_test.json`` / ``_val`` / ``flickr30k_test.json``:
  ``[{"image": path, "caption": [5 captions]}]``. As ``re_eval_dataset`` does, image ``i`` owns
  text ids ``img2txt[i]`` numbered in file order, and ``txt2img`` maps them back. Evaluation
  ground truth must not change silently, so a malformed file is an error here, not a skip.
* **VQA** -- ``vqa_train.json``, ``vqa_val.json``, ``vg_qa.json``, ``vqa_test.json``:
  ``{"question_id", "question", "answer": [..], "image", "dataset": "vqa" | "vg"}``. As
  ``vqa_dataset`` does, a ``vqa`` question weighs each distinct answer by its share of the
  answers and a ``vg`` answer gets weight 0.2; images resolve against the root of their dataset.
* **NLVR2** -- ``nlvr_train.json`` / ``nlvr_dev.json`` / ``nlvr_test.json``:
  ``[{"images": [path0, path1], "sentence": str, "label": "True" | "False"}]``, a statement about a
  pair of images and whether it is true (``nlvr_dataset``).

Each source has ``len()`` and ``sample(index, stats) -> Sample``; ``sample`` raises
:class:`~blip_fast.data.sample.BadSample` for an entry it cannot use. Entries are checked when
they are read, not when the file is loaded, so the counts in ``DataStats`` follow the stream.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .decode import check_answers, check_caption, check_question
from .sample import BAD_RECORD, BadSample, DataStats, Sample


def load_json(path: str | Path, what: str = "annotation file"):
    """The content of a JSON file; a missing one is a FileNotFoundError and a malformed one a ValueError, each
    naming ``what`` it is or the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def load_json_list(path: str | Path) -> list:
    """A JSON file whose top level is a list (a missing or malformed file is a ValueError)."""
    entries = load_json(path)
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of annotations, got {type(entries).__name__}")
    return entries


def _load_all(paths) -> list:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    entries = []
    for path in paths:
        entries += load_json_list(path)
    return entries


def _image_path(entry, index: int, root: str | Path | None) -> str:
    if not isinstance(entry, dict):
        raise BadSample(BAD_RECORD, f"entry {index} is {type(entry).__name__}, not an object")
    image = entry.get("image")
    if not isinstance(image, str) or not image:
        raise BadSample(BAD_RECORD, f"entry {index} has no image path")
    return os.path.join(root, image) if root is not None else image


class CaptionAnnotations:
    """Caption lists (pretraining files, Karpathy training splits); several files are concatenated.

    ``image_root`` is joined to each relative ``image`` path (absolute paths, as in BLIP's
    pretraining files, stay as they are). ``extra`` holds the entry's other fields, its ``index``
    and, where the entry has an ``image_id``, the consecutive ``img_id``.
    """

    def __init__(self, paths, image_root: str | Path | None = None):
        self.entries = _load_all(paths)
        self.image_root = None if image_root is None else str(image_root)
        self.img_ids: dict = {}
        for entry in self.entries:
            if isinstance(entry, dict) and "image_id" in entry:
                image_id = entry["image_id"]
                if _valid_image_id(image_id) and image_id not in self.img_ids:
                    self.img_ids[image_id] = len(self.img_ids)

    def __len__(self) -> int:
        return len(self.entries)

    def sample(self, index: int, stats: DataStats) -> Sample:
        entry = self.entries[index]
        path = _image_path(entry, index, self.image_root)
        caption = check_caption(entry.get("caption"), stats, what=f"entry {index}")
        extra = {k: v for k, v in entry.items() if k not in ("image", "caption")}
        extra["index"] = index
        if "image_id" in entry:
            if not _valid_image_id(entry["image_id"]):
                raise BadSample(BAD_RECORD, f"entry {index}: image_id {entry['image_id']!r} is not a string or int")
            extra["img_id"] = self.img_ids[entry["image_id"]]
        return Sample(key=str(index), image_path=path, caption=caption, extra=extra)


def _valid_image_id(image_id) -> bool:
    """A string or an integer; not a bool or a float, which as keys would be the same image as an int (True == 1,
    1.0 == 1), nor a list or dict, which are not keys at all."""
    return isinstance(image_id, str) or (isinstance(image_id, int) and not isinstance(image_id, bool))


class RetrievalAnnotations:
    """A retrieval evaluation split: images with their captions, and the text ids that link them.

    ``texts`` are the captions in file order (raw; clean them with ``clean_caption`` and the
    evaluation's ``max_words``), ``img2txt[i]`` the text ids of image ``i``, ``txt2img[t]`` the
    image of text ``t``. A sample's ``extra`` holds its ``image_index`` and ``text_ids``.
    """

    def __init__(self, path: str | Path, image_root: str | Path | None = None):
        self.entries = load_json_list(path)
        self.image_root = None if image_root is None else str(image_root)
        self.texts: list[str] = []
        self.img2txt: list[list[int]] = []
        self.txt2img: list[int] = []
        for index, entry in enumerate(self.entries):
            try:
                _image_path(entry, index, None)
            except BadSample as error:
                raise ValueError(f"{path}: {error.detail}") from None
            captions = entry.get("caption")
            captions = [captions] if isinstance(captions, str) else captions
            if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
                raise ValueError(f"{path}: entry {index} must have a caption or a list of captions (strings)")
            self.img2txt.append(list(range(len(self.texts), len(self.texts) + len(captions))))
            self.txt2img += [index] * len(captions)
            self.texts += captions

    def __len__(self) -> int:
        return len(self.entries)

    def sample(self, index: int, stats: DataStats) -> Sample:
        entry = self.entries[index]
        ids = self.img2txt[index]
        return Sample(key=str(index), image_path=_image_path(entry, index, self.image_root),
                      caption=[self.texts[t] for t in ids], extra={"image_index": index, "text_ids": ids})


class VqaAnnotations:
    """VQA questions. ``image_roots``: one root, or ``{"vqa": coco_root, "vg": vg_root}`` by ``dataset``.

    ``extra``: ``question_id``, ``question`` (raw; clean with ``clean_question``), ``dataset``,
    ``index`` and, for training entries (those with an ``answer`` field), ``answers`` and
    ``weights`` as the original computes them. ``caption`` is ``None``.
    """

    def __init__(self, paths, image_roots: str | Path | dict | None = None):
        self.entries = _load_all(paths)
        self.image_roots = image_roots if isinstance(image_roots, dict) or image_roots is None else str(image_roots)
        if isinstance(self.image_roots, dict):
            needed = {e.get("dataset", "vqa") for e in self.entries
                      if isinstance(e, dict) and isinstance(e.get("dataset", "vqa"), str)}
            missing = sorted(needed - set(self.image_roots))
            if missing:
                raise ValueError(f"no image root for VQA dataset(s) {', '.join(missing)}; give image_roots for each")

    def __len__(self) -> int:
        return len(self.entries)

    def sample(self, index: int, stats: DataStats) -> Sample:
        entry = self.entries[index]
        if not isinstance(entry, dict):
            raise BadSample(BAD_RECORD, f"entry {index} is {type(entry).__name__}, not an object")
        dataset = entry.get("dataset", "vqa")
        if isinstance(self.image_roots, dict):
            if not isinstance(dataset, str) or dataset not in self.image_roots:
                raise BadSample(BAD_RECORD, f"entry {index}: unknown dataset {dataset!r}")
            root = self.image_roots[dataset]
        else:
            root = self.image_roots
        path = _image_path(entry, index, root)
        what = f"question {entry.get('question_id', index)}"
        extra = {"question_id": entry.get("question_id"), "question": check_question(entry.get("question"), what),
                 "dataset": dataset, "index": index}
        if "answer" in entry:
            answers = check_answers(entry["answer"], stats, what)
            if dataset == "vg":
                weights = {answer: 0.2 for answer in answers}
            else:
                weights = {}
                for answer in answers:
                    weights[answer] = weights.get(answer, 0.0) + 1 / len(answers)
            extra["answers"], extra["weights"] = list(weights), list(weights.values())
        key = str(entry["question_id"]) if "question_id" in entry else str(index)
        return Sample(key=key, image_path=path, caption=None, extra=extra)


NLVR_LABELS = {"True": 1, "False": 0}


class NlvrAnnotations:
    """NLVR2 statements about pairs of images; several files are concatenated, ``image_root`` is joined to each path.

    A sample's image is the pair's first; ``extra`` holds ``second_image`` (its path, read and decoded by whoever
    prepares the sample), ``sentence`` (raw; clean with ``clean_caption``), ``label`` (1 for ``"True"``, 0 for
    ``"False"``) and ``index``. ``caption`` is ``None``. An entry without two image paths, with a sentence that has
    no word left after cleaning, or with a label other than ``"True"`` or ``"False"`` is a :class:`BadSample` (the
    original reads any other label as false, which would train on a typo as a fact).
    """

    def __init__(self, paths, image_root: str | Path | None = None):
        self.entries = _load_all(paths)
        self.image_root = None if image_root is None else str(image_root)

    def __len__(self) -> int:
        return len(self.entries)

    def sample(self, index: int, stats: DataStats) -> Sample:
        entry = self.entries[index]
        if not isinstance(entry, dict):
            raise BadSample(BAD_RECORD, f"entry {index} is {type(entry).__name__}, not an object")
        images = entry.get("images")
        if not (isinstance(images, list) and len(images) == 2 and all(isinstance(i, str) and i for i in images)):
            raise BadSample(BAD_RECORD, f"entry {index}: images must be a list of two paths; got {images!r}"[:300])
        label = entry.get("label")
        if not isinstance(label, str) or label not in NLVR_LABELS:
            raise BadSample(BAD_RECORD, f"entry {index}: label must be \"True\" or \"False\"; got {label!r}"[:300])
        first, second = (os.path.join(self.image_root, i) if self.image_root is not None else i for i in images)
        extra = {"second_image": second, "sentence": check_caption(entry.get("sentence"), what=f"entry {index}"),
                 "label": NLVR_LABELS[label], "index": index}
        return Sample(key=str(index), image_path=first, extra=extra)
