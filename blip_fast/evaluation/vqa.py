"""VQA evaluation as the original ``evaluation`` of ``train_vqa.py``: an answer per question, scored when the
split has the humans' answers.

Each question is cleaned as the original ``pre_question`` and tokenized to at most 35 tokens; its image goes
through the evaluation transform (bicubic resize, no crop). Two ways to answer, as the original's ``inference``:

* ``rank`` (the original's default): the answer list (``answer_list.json``) is tokenized once, and each question
  gets the candidate :meth:`~blip_fast.models.blip_vqa.BlipVQA.rank_answers` picks among the ``k`` (128 in the
  original) whose first token is likeliest; the decoder attends to the question's real tokens, so an answer does
  not depend on the batch it is in;
* ``generate``: beam search with 3 beams, at most 10 tokens ([DEC] included), at least 1, as the original. As
  there, the decoder attends to every position of the question's states, its padding included: an answer can
  change with the longest question of its batch.

The answers are written in the official submission format (:meth:`VqaResult.write_answers`). A split whose
entries carry the humans' answers (``"answer"``: a list, ten in VQA v2) is scored with the official VQA accuracy
(:mod:`blip_fast.evaluation.vqa_accuracy`), overall and, where every entry has an ``"answer_type"``, per answer
type. Evaluation ground truth must not change silently: a malformed question or answer, an unreadable image, a
question id given twice, or answers on some questions but not on others are errors, not skips.

Scoring questions the model was trained on inflates the accuracy without saying so: :func:`check_not_trained_on`
refuses an evaluation file that shares question ids with the training files (BLIP's VQA fine-tuning trains on
``vqa_train``, ``vqa_val`` and ``vg_qa``: its held-out split is ``vqa_test``, scored by the official server).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.annotations import VqaAnnotations, load_json_list
from ..data.sample import BadSample
from ..models.blip_vqa import tokenize_answer_list
from ..models.generation import GenerationConfig
from ..text import BlipTokenizer, clean_question
from .images import evaluation_images
from .vqa_accuracy import VQAAccuracy, write_vqa_results
from .vqa_accuracy import evaluate_vqa as vqa_accuracy_of

INFERENCES = ("rank", "generate")
QUESTION_MAX_LENGTH = 35  # BLIP_VQA.forward truncates questions there
# BLIP_VQA.forward(inference='generate')
ORIGINAL_BEAMS, ORIGINAL_MAX_LENGTH, ORIGINAL_MIN_LENGTH = 3, 10, 1


@dataclass
class VqaResult:
    questions: int
    inference: str
    """``rank`` or ``generate``."""
    k: int
    """Candidates shortlisted per question (``rank``, at most the answer list's length); 0 for ``generate``."""
    candidates: int
    """Answers in the answer list (``rank``); 0 for ``generate``."""
    answers: dict[int, str]
    """Question id -> predicted answer, in the split's order."""
    accuracy: VQAAccuracy | None
    """The official VQA accuracy, per question too; None when the split has no human answers."""

    @property
    def metrics(self) -> dict[str, float]:
        """``accuracy`` and ``accuracy_<answer type>`` in percent; empty without human answers."""
        if self.accuracy is None:
            return {}
        return {"accuracy": self.accuracy.overall} | {f"accuracy_{kind}": value
                                                     for kind, value in self.accuracy.per_answer_type.items()}

    @property
    def score(self) -> float:
        """What picks the best epoch: the overall accuracy."""
        if self.accuracy is None:
            raise ValueError("this VQA split has no human answers: there is no accuracy to compare")
        return self.accuracy.overall

    def summary(self) -> str:
        how = (f"ranked among the top {self.k} of {self.candidates} answers" if self.inference == "rank"
               else f"generated, beam search with {ORIGINAL_BEAMS} beams")
        if self.accuracy is None:
            return f"VQA on {self.questions} questions ({how}): no human answers, answers only"
        kinds = ", ".join(f"{kind} {value:.2f}" for kind, value in self.accuracy.per_answer_type.items())
        return (f"VQA on {self.questions} questions ({how}): accuracy {self.accuracy.overall:.2f}"
                + (f" ({kinds})" if kinds else ""))

    def write_answers(self, path: str | Path) -> Path:
        """The answers as the official result file, ``[{"question_id": int, "answer": str}]``."""
        return write_vqa_results(path, self.answers)


@dataclass
class VqaQuestion:
    """One evaluation question: its id, cleaned text and image path, and the humans' answers when known."""

    question_id: int
    question: str
    image_path: str
    human_answers: list[str] | None
    answer_type: str | None


def read_vqa_questions(annotations: VqaAnnotations, limit: int | None = None) -> list[VqaQuestion]:
    """The first ``limit`` questions of the split, checked (see the module docstring)."""
    n = len(annotations) if limit is None else min(limit, len(annotations))
    if n < 1:
        raise ValueError("no VQA questions to evaluate")
    questions, seen = [], set()
    for index in range(n):
        try:
            sample = annotations.sample(index, stats=None)
        except BadSample as error:
            raise ValueError(f"evaluation question {index}: {error}") from None
        entry, question_id = annotations.entries[index], sample.extra["question_id"]
        if isinstance(question_id, bool) or not isinstance(question_id, int):
            raise ValueError(f"evaluation question {index}: question_id must be an int, got {question_id!r}")
        if question_id in seen:
            raise ValueError(f"evaluation question {index}: question id {question_id} is given twice")
        seen.add(question_id)
        answers = entry.get("answer")
        # the humans' answers as they are, repeats included: VQA accuracy counts how many humans gave each
        if answers is not None and not (isinstance(answers, list) and len(answers) >= 2
                                        and all(isinstance(answer, str) for answer in answers)):
            raise ValueError(f"evaluation question {question_id}: \"answer\" must be a list of at least two human "
                             f"answers (strings), got {answers!r}"[:300])
        answer_type = entry.get("answer_type")
        if answer_type is not None and not isinstance(answer_type, str):
            raise ValueError(f"evaluation question {question_id}: answer_type must be a string, got {answer_type!r}")
        questions.append(VqaQuestion(question_id, clean_question(sample.extra["question"]), sample.image_path,
                                     answers, answer_type))
    _check_all_or_none(questions, "human_answers", "the humans' answers (\"answer\")")
    _check_all_or_none(questions, "answer_type", "an answer_type")
    return questions


def _check_all_or_none(questions: list[VqaQuestion], field: str, what: str) -> None:
    missing = [q.question_id for q in questions if getattr(q, field) is None]
    if 0 < len(missing) < len(questions):
        raise ValueError(f"{len(questions) - len(missing)} evaluation questions have {what} and {len(missing)} do "
                         f"not (first {missing[:3]}): score a split with it on every question, or on none")


@torch.no_grad()
def vqa_answers(model, questions: list[VqaQuestion], image_size: int, answer_list: Sequence[str] | None = None,
                inference: str = "rank", k: int = 128, batch_size: int = 32) -> list[str]:
    """The model's answer to each question, by ``inference`` (``rank`` needs ``answer_list``)."""
    if inference not in INFERENCES:
        raise ValueError(f"inference must be one of {', '.join(INFERENCES)}; got {inference!r}")
    if batch_size < 1 or k < 1:
        raise ValueError(f"batch_size and k must be at least 1; got {batch_size} and {k}")
    tokenizer = BlipTokenizer()
    parameter = next(model.parameters())
    if inference == "rank":
        if not answer_list:
            raise ValueError("rank inference needs the answer list (answer_list.json) to rank")
        candidates = tokenize_answer_list(answer_list, model.config.text.max_position_embeddings, tokenizer)
        candidate_ids = candidates.input_ids.to(parameter.device)
        candidate_mask = candidates.attention_mask.to(parameter.device)
    else:
        generation = GenerationConfig(strategy="beam", max_length=ORIGINAL_MAX_LENGTH,
                                      min_length=ORIGINAL_MIN_LENGTH, num_beams=ORIGINAL_BEAMS)
    answers = []
    for first in range(0, len(questions), batch_size):
        batch = questions[first:first + batch_size]
        images = evaluation_images([q.image_path for q in batch], image_size).to(parameter.device, parameter.dtype)
        text = tokenizer([q.question for q in batch], max_length=QUESTION_MAX_LENGTH)
        ids, mask = text.input_ids.to(parameter.device), text.attention_mask.to(parameter.device)
        if inference == "rank":
            picked = model.rank_answers(images, ids, mask, candidate_ids, candidate_mask, k)
            answers += [answer_list[index] for index in picked.tolist()]
        else:
            answers += tokenizer.batch_decode(model.generate(images, ids, mask, generation))
    return answers


def evaluate_vqa(model, annotations: VqaAnnotations, image_size: int, answer_list: Sequence[str] | None = None,
                 inference: str = "rank", k: int = 128, batch_size: int = 32,
                 limit: int | None = None) -> VqaResult:
    """Answer the first ``limit`` questions of ``annotations`` and, when the split has the humans' answers, score
    them (see the module docstring). ``model``: a :class:`~blip_fast.models.blip_vqa.BlipVQA`."""
    questions = read_vqa_questions(annotations, limit)
    was_training = model.training
    model.eval()
    try:
        predicted = vqa_answers(model, questions, image_size, answer_list, inference, k, batch_size)
    finally:
        model.train(was_training)
    answers = {q.question_id: answer for q, answer in zip(questions, predicted, strict=True)}
    accuracy = None
    if questions[0].human_answers is not None:
        types = {q.question_id: q.answer_type for q in questions} if questions[0].answer_type is not None else None
        accuracy = vqa_accuracy_of(answers, {q.question_id: q.human_answers for q in questions}, types)
    ranked = inference == "rank"
    return VqaResult(len(questions), inference, min(k, len(answer_list)) if ranked else 0,
                     len(answer_list) if ranked else 0, answers, accuracy)


def _question_keys(paths) -> dict[tuple[str, int], str]:
    """(dataset, question id) -> the file it is in, of every entry with a question id; the dataset ("vqa" when the
    entry names none) is part of the key, as VQA and Visual Genome number their questions independently."""
    keys = {}
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        for entry in load_json_list(path):
            question_id = entry.get("question_id") if isinstance(entry, dict) else None
            if isinstance(question_id, (int, str)):
                keys.setdefault((str(entry.get("dataset", "vqa")), question_id), str(path))
    return keys


def check_not_trained_on(train_paths, eval_paths) -> None:
    """Refuse (ValueError naming the files and the first shared ids) to evaluate on the questions of
    ``eval_paths`` that any of ``train_paths`` has: same dataset and question id. Paths: one or a list."""
    trained = _question_keys(train_paths)
    evaluated = _question_keys(eval_paths)
    shared = [key for key in evaluated if key in trained]
    if shared:
        files = sorted({trained[key] for key in shared})
        raise ValueError(f"{len(shared)} of the {len(evaluated)} evaluation questions are training questions too "
                         f"({', '.join(files)}; first question ids {[key[1] for key in shared[:5]]}): the accuracy "
                         "would be inflated; evaluate on a held-out split")
