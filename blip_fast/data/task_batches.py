"""Training batches of VQA and NLVR2, resumable as the caption batches are (``batches.ResumableBatches``).

    source = VqaAnnotations(["vqa_train.json", "vg_qa.json"], {"vqa": coco_root, "vg": vg_root})
    batches = VqaBatches(source, TransformConfig.finetune(480), batch_size=16, num_workers=8)
    for batch in batches:
        b = batch.to("cuda", non_blocking=True)
        loss = vqa_model(b.images, b.question_ids, b.question_mask, b.answer_ids, b.answer_mask, b.weights,
                         b.answers_per_question)

    batches = NlvrBatches(NlvrAnnotations("nlvr_train.json", image_root), TransformConfig.finetune(384), 16)
    for batch in batches:
        b = batch.to("cuda", non_blocking=True)
        loss = nlvr_model(b.images, b.input_ids, b.attention_mask, b.targets)

**VQA** (the training split of the original's ``vqa_dataset``, ``vqa_collate_fn`` and the tokenization in
``blip_vqa.forward``): each question is cleaned with ``pre_question``
(:func:`~blip_fast.text.clean.clean_question`), its image transformed, and it keeps its distinct answers with the
weights :class:`~blip_fast.data.annotations.VqaAnnotations` computes as the original does. A batch's questions are
tokenized padded to the longest, truncated at 35 tokens; all its answers, flattened in question order, are
tokenized padded to the longest (the original does not truncate them: ``answer_max_length`` only keeps them within
the model's positions); ``answers_per_question`` says which answers are whose. A question without answers (a test
entry) is skipped and counted (``no_answer``).

**NLVR2** (the original's ``nlvr_dataset`` and the tokenization in ``blip_nlvr.forward``): each statement is
cleaned with ``pre_caption(sentence, 40)`` and both images are transformed, each with its own random draw. With
probability 0.5 the pair is swapped, and the words ``left`` and ``right`` of the statement exchanged (when it has
neither, only the images are swapped), the label staying what it was: a swapped pair with its sides exchanged is
as true as the unswapped one, so the augmentation doubles the pairs (the original's dataset swaps on its
evaluation splits too; ``swap=False`` turns it off). A batch's ``images`` are all the first images, then all the
second images, as ``BlipNLVR`` takes them.

Images are transformed with PIL in the DataLoader workers (the DALI backend is the caption batches' only). Every
random choice -- crop and augmentation of each image, NLVR2's swap -- draws from a generator of ``(seed, epoch,
sample key, draw)`` (:meth:`~blip_fast.data.batches.SamplePrepare.rng`): the batches are a function of the
settings, the same whatever the worker count, different each epoch, and a resumed pass continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..text.clean import clean_caption, clean_question
from ..text.tokenizer import BlipTokenizer
from .annotations import NlvrAnnotations, VqaAnnotations
from .batches import ResumableBatches, SamplePrepare, check_batch_settings, pinned
from .decode import decode_image, has_words, read_image_file
from .sample import NO_ANSWER, NO_CAPTION, BadSample, Sample
from .transforms import PilTransform, TransformConfig

# the draw numbers of a sample's random choices (the last word of its generators' seeds)
_IMAGE_DRAW, _SECOND_IMAGE_DRAW, _SWAP_DRAW = 1, 2, 3
_OTHER_SIDE = {"left": "right", "right": "left"}


def _check_max_length(name: str, value: int) -> None:
    if value < 2:
        raise ValueError(f"{name} must be at least 2 ([CLS] and [SEP]), got {value}")


# --- VQA ---------------------------------------------------------------------------------------------------------

@dataclass
class VqaBatch:
    """One VQA training batch: what ``BlipVQA.forward`` takes, in its order, and the questions' keys."""

    images: torch.Tensor
    """(B, 3, S, S) in ``TransformConfig.dtype``."""
    question_ids: torch.Tensor
    """(B, Lq) long, [CLS] first and [SEP] last, padded with 0; Lq is the longest question of the batch."""
    question_mask: torch.Tensor
    """(B, Lq) long, 1 on real tokens."""
    answer_ids: torch.Tensor
    """(A, La) long: every question's answers in turn, [CLS] first and [SEP] last, padded to the longest."""
    answer_mask: torch.Tensor
    """(A, La) long, 1 on real tokens."""
    weights: torch.Tensor
    """(A,) float32: each answer's weight (its share of the humans' answers; 0.2 for Visual Genome)."""
    answers_per_question: torch.Tensor
    """(B,) long: how many rows of ``answer_ids`` each question has (they sum to A)."""
    keys: list[str]
    """The questions' keys (their ``question_id``, else their entry index), for logging."""

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.images, self.question_ids, self.question_mask, self.answer_ids, self.answer_mask, self.weights,
                self.answers_per_question)

    def to(self, device, non_blocking: bool = False) -> VqaBatch:
        return VqaBatch(*(t.to(device, non_blocking=non_blocking) for t in self._tensors()), self.keys)

    def pin_memory(self) -> VqaBatch:
        """The batch with its host tensors in page-locked memory (the DataLoader calls this with ``pin_memory``)."""
        return VqaBatch(*(pinned(t) for t in self._tensors()), self.keys)

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class _Question:
    key: str
    image: torch.Tensor
    question: str
    answers: list[str]
    weights: list[float]


class _PrepareQuestion(SamplePrepare):
    """A VQA training question: the cleaned question, the transformed image, the answers and their weights."""

    def __init__(self, transform: PilTransform, seed: int):
        super().__init__(seed)
        self.transform = transform

    def __call__(self, sample: Sample) -> _Question:
        extra = sample.extra
        if "answers" not in extra:
            raise BadSample(NO_ANSWER, f"question {sample.key} has no answer to train on (is it a test entry?)")
        image = self.transform(sample.image, self.rng(sample.key, _IMAGE_DRAW))
        return _Question(sample.key, image, clean_question(extra["question"]), extra["answers"], extra["weights"])


class _CollateQuestions:
    """Runs in the worker: ``vqa_collate_fn``, then the tokenization of ``blip_vqa.forward``."""

    def __init__(self, tokenizer: BlipTokenizer, question_max_length: int, answer_max_length: int):
        self.tokenizer = tokenizer
        self.question_max_length, self.answer_max_length = question_max_length, answer_max_length

    def __call__(self, questions: list[_Question]) -> VqaBatch:
        asked = self.tokenizer([q.question for q in questions], max_length=self.question_max_length)
        answers = self.tokenizer([a for q in questions for a in q.answers], max_length=self.answer_max_length)
        return VqaBatch(torch.stack([q.image for q in questions]), asked.input_ids, asked.attention_mask,
                        answers.input_ids, answers.attention_mask,
                        torch.tensor([w for q in questions for w in q.weights], dtype=torch.float32),
                        torch.tensor([len(q.answers) for q in questions], dtype=torch.long),
                        [q.key for q in questions])


class VqaBatches(ResumableBatches):
    """VQA training batches (:class:`VqaBatch`) of a :class:`~blip_fast.data.annotations.VqaAnnotations` source,
    resumable (see the module docstring and :class:`~blip_fast.data.batches.ResumableBatches`).

    ``transform``: the image transform (the original's ``transform_train``: ``TransformConfig.finetune``).
    ``question_max_length``: the original's 35. ``answer_max_length``: at most the text model's
    ``max_position_embeddings`` (512, the default, is BERT's; the original does not truncate answers).
    ``num_workers``, ``seed``, ``shuffle``, ``rank`` and ``world_size`` are the
    :class:`~blip_fast.data.stream.SampleStream`'s; ``drop_last`` drops each worker's last, partial batch.
    """

    what = "vqa batches"

    def __init__(self, source: VqaAnnotations, transform: TransformConfig, batch_size: int, *, num_workers: int = 0,
                 seed: int = 0, shuffle: bool = True, rank: int | None = None, world_size: int | None = None,
                 question_max_length: int = 35, answer_max_length: int = 512, drop_last: bool = True,
                 tokenizer: BlipTokenizer | None = None, pin_memory: bool = False):
        if not isinstance(source, VqaAnnotations):
            raise ValueError(f"VqaBatches reads VqaAnnotations; got {type(source).__name__}")
        check_batch_settings(transform, batch_size)
        _check_max_length("question_max_length", question_max_length)
        _check_max_length("answer_max_length", answer_max_length)
        prepare = _PrepareQuestion(PilTransform(transform), seed)
        collate = _CollateQuestions(tokenizer or BlipTokenizer(), question_max_length, answer_max_length)
        super().__init__(source, transform, batch_size, prepare, collate, num_workers=num_workers, seed=seed,
                         shuffle=shuffle, rank=rank, world_size=world_size, drop_last=drop_last,
                         pin_memory=pin_memory)


# --- NLVR2 -------------------------------------------------------------------------------------------------------

@dataclass
class NlvrBatch:
    """One NLVR2 training batch: what ``BlipNLVR.forward`` takes, in its order, and the pairs' keys."""

    images: torch.Tensor
    """(2B, 3, S, S) in ``TransformConfig.dtype``: the B first images of the pairs, then their B second images."""
    input_ids: torch.Tensor
    """(B, L) long: the statements, [CLS] first and [SEP] last, padded with 0 to the longest of the batch."""
    attention_mask: torch.Tensor
    """(B, L) long, 1 on real tokens."""
    targets: torch.Tensor
    """(B,) long: 1 where the statement is true of its pair."""
    keys: list[str]
    """The pairs' keys (their entry index), for logging."""

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return self.images, self.input_ids, self.attention_mask, self.targets

    def to(self, device, non_blocking: bool = False) -> NlvrBatch:
        return NlvrBatch(*(t.to(device, non_blocking=non_blocking) for t in self._tensors()), self.keys)

    def pin_memory(self) -> NlvrBatch:
        """The batch with its host tensors in page-locked memory (the DataLoader calls this with ``pin_memory``)."""
        return NlvrBatch(*(pinned(t) for t in self._tensors()), self.keys)

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class _Statement:
    key: str
    first: torch.Tensor
    second: torch.Tensor
    sentence: str
    label: int


def exchange_sides(sentence: str) -> str:
    """The statement with the words ``left`` and ``right`` exchanged (whole words only, as the original)."""
    return " ".join(_OTHER_SIDE.get(word, word) for word in sentence.split(" "))


class _PrepareStatement(SamplePrepare):
    """An NLVR2 pair: the cleaned statement, both images read and transformed, swapped half the time (``swap``)."""

    def __init__(self, transform: PilTransform, max_words: int, swap: bool, seed: int):
        super().__init__(seed)
        self.transform, self.max_words, self.swap = transform, max_words, swap

    def __call__(self, sample: Sample) -> _Statement:
        extra = sample.extra
        sentence = clean_caption(extra["sentence"], self.max_words)
        if not has_words(sentence):
            raise BadSample(NO_CAPTION, f"pair {sample.key}: no word left in {sentence!r} after cutting it at "
                                        f"{self.max_words} words"[:300])
        path = extra["second_image"]
        # the stream read and checked the first image; the second is read here, its repairs counted alike
        second_image = decode_image(read_image_file(path), self.stream.stats, what=path)
        first = self.transform(sample.image, self.rng(sample.key, _IMAGE_DRAW))
        second = self.transform(second_image, self.rng(sample.key, _SECOND_IMAGE_DRAW))
        if self.swap and self.rng(sample.key, _SWAP_DRAW).random() < 0.5:
            first, second, sentence = second, first, exchange_sides(sentence)
        return _Statement(sample.key, first, second, sentence, extra["label"])


class _CollateStatements:
    """Runs in the worker: the statements tokenized (padded to the longest), first images then second images."""

    def __init__(self, tokenizer: BlipTokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, statements: list[_Statement]) -> NlvrBatch:
        text = self.tokenizer([s.sentence for s in statements], max_length=self.max_length)
        images = torch.stack([s.first for s in statements] + [s.second for s in statements])
        return NlvrBatch(images, text.input_ids, text.attention_mask,
                         torch.tensor([s.label for s in statements], dtype=torch.long), [s.key for s in statements])


class NlvrBatches(ResumableBatches):
    """NLVR2 training batches (:class:`NlvrBatch`) of a :class:`~blip_fast.data.annotations.NlvrAnnotations`
    source, resumable (see the module docstring and :class:`~blip_fast.data.batches.ResumableBatches`).

    ``transform``: the image transform (the original's ``transform_train``: ``TransformConfig.finetune``).
    ``max_words``: the original's 40. ``max_length``: at most the text model's ``max_position_embeddings`` (512,
    the default, is BERT's; the original does not truncate statements). ``swap``: swap half the pairs, with
    ``left`` and ``right`` (the original's training augmentation). ``num_workers``, ``seed``, ``shuffle``, ``rank``
    and ``world_size`` are the :class:`~blip_fast.data.stream.SampleStream`'s; ``drop_last`` drops each worker's
    last, partial batch.
    """

    what = "nlvr2 batches"

    def __init__(self, source: NlvrAnnotations, transform: TransformConfig, batch_size: int, *,
                 num_workers: int = 0, seed: int = 0, shuffle: bool = True, rank: int | None = None,
                 world_size: int | None = None, max_words: int = 40, max_length: int = 512, swap: bool = True,
                 drop_last: bool = True, tokenizer: BlipTokenizer | None = None, pin_memory: bool = False):
        if not isinstance(source, NlvrAnnotations):
            raise ValueError(f"NlvrBatches reads NlvrAnnotations; got {type(source).__name__}")
        check_batch_settings(transform, batch_size)
        if max_words < 1:
            raise ValueError(f"max_words must be at least 1, got {max_words}")
        _check_max_length("max_length", max_length)
        prepare = _PrepareStatement(PilTransform(transform), max_words, swap, seed)
        collate = _CollateStatements(tokenizer or BlipTokenizer(), max_length)
        super().__init__(source, transform, batch_size, prepare, collate, num_workers=num_workers, seed=seed,
                         shuffle=shuffle, rank=rank, world_size=world_size, drop_last=drop_last,
                         pin_memory=pin_memory)
