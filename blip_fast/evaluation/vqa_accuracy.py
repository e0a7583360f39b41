"""VQA accuracy as the official VQA v2 evaluation (``vqaEval.py`` of GT-Vision-Lab/VQA) computes it.

**Normalisation** of an answer, in the official order:

1. line breaks and tabs become spaces, surrounding whitespace is stripped;
2. punctuation: each mark of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted where it touches a
   space somewhere in the answer and replaced by a space otherwise, decided per mark for the whole
   answer ("x-y -z" -> "xy z"); an answer with a comma between two digits ("1,000") has every mark
   deleted ("1000"). The apostrophe and the colon are kept ("don't", "10:30");
3. a period is deleted unless a digit follows it, so decimals survive ("3.5") and sentence ends go
   ("yes." -> "yes", "2." -> "2");
4. lowercase, then word by word: number words "none", "zero" .. "ten" become digits, the articles
   "a", "an", "the" are dropped, and apostrophe-less contractions get their apostrophe ("dont" ->
   "don't").

**Accuracy** of a prediction against the human answers (10 in VQA v2): for each human, the prediction
scores min(1, matches among the OTHER humans / 3), and the question's accuracy is the mean over the
humans, in percent. A prediction given by 3 of 10 humans scores 90, by 4 or more 100.

One deliberate difference: the human answers are normalised exactly like the prediction. The official
script only applies the punctuation step to them, and only when they disagree, because its
annotation files already hold normalised answers; on such answers normalisation changes nothing,
so the two agree there, and answers that are not yet normalised ("two" against a predicted "2")
are compared as the prediction is. The official script also rounds to 2 decimals; nothing is
rounded here.

Results are exchanged in the official submission format, a JSON list of
``{"question_id": int, "answer": str}``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint.io import atomic_write

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its "(?!<=\d)" reads as a lookahead for the text "<=" and a digit,
# not as a lookbehind, so only the digit after a period protects it
PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
# The official table, less its entries that can never apply: the capitalised keys (Im, Ive, Id've, I'dve) are looked
# up after lowercasing, so "im" stays "im" there too, and "let's"/"she's" map to themselves. Its one entry that removes
# an apostrophe ("somebody'd" -> "somebodyd") is kept, as scores depend on it.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}


def normalize_answer(answer: str) -> str:
    """An answer in the form the official evaluation compares (steps 1-4 of the module docstring)."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    delete_all = COMMA_BETWEEN_DIGITS.search(text) is not None
    spaced = text
    for mark in PUNCTUATION:
        # decided on the text as it came in, not as earlier marks left it (as the official loop does)
        touches_space = f"{mark} " in text or f" {mark}" in text
        spaced = spaced.replace(mark, "" if delete_all or touches_space else " ")
    spaced = PERIOD_NOT_BEFORE_DIGIT.sub("", spaced)
    words = (NUMBER_WORDS.get(word, word) for word in spaced.lower().split())
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """Accuracy in percent of one predicted answer against a question's human answers (at least two: each
    human's share is judged by the others)."""
    if isinstance(human_answers, str) or len(human_answers) < 2:
        raise ValueError(f"VQA accuracy needs a list of at least two human answers, got {human_answers!r}")
    predicted = normalize_answer(prediction)
    same = [normalize_answer(answer) == predicted for answer in human_answers]
    matches = sum(same)
    # leave-one-out: a human who gave the predicted answer is not among their own "others"
    return 100.0 * sum(min(1.0, (matches - own) / 3) for own in same) / len(same)


@dataclass(frozen=True)
class VQAAccuracy:
    overall: float
    """Mean accuracy over the questions, in percent."""
    per_question: dict[int, float]
    per_answer_type: dict[str, float]
    """Mean accuracy of the questions of each answer type ("yes/no", "number", "other" in VQA v2); empty when no
    answer types were given."""


def evaluate_vqa(predictions: Mapping[int, str], human_answers: Mapping[int, Sequence[str]],
                 answer_types: Mapping[int, str] | None = None) -> VQAAccuracy:
    """VQA accuracy of ``predictions`` (question id -> answer) against ``human_answers`` (question id -> the
    humans' answers), per question, overall and, with ``answer_types`` (question id -> type), per answer type.
    Every question needs exactly one prediction: a missing or unknown question id is an error, not a skip."""
    if not human_answers:
        raise ValueError("no questions to evaluate")
    _check_same_questions(set(predictions), set(human_answers), "predictions")
    per_question = {question: vqa_accuracy(predictions[question], answers)
                    for question, answers in human_answers.items()}
    by_type: dict[str, list[float]] = {}
    if answer_types is not None:
        _check_same_questions(set(answer_types), set(human_answers), "answer_types")
        for question, accuracy in per_question.items():
            by_type.setdefault(answer_types[question], []).append(accuracy)
    return VQAAccuracy(overall=sum(per_question.values()) / len(per_question), per_question=per_question,
                       per_answer_type={kind: sum(values) / len(values) for kind, values in by_type.items()})


def _check_same_questions(given: set, expected: set, what: str) -> None:
    missing, unknown = sorted(expected - given, key=str), sorted(given - expected, key=str)
    if missing or unknown:
        raise ValueError(f"{what} do not cover the same questions as the human answers: {len(missing)} missing "
                         f"(first {missing[:3]}), {len(unknown)} unknown (first {unknown[:3]})")


def write_vqa_results(path: str | Path, results: Mapping[int, str]) -> Path:
    """Write ``results`` (question id -> answer) as the official result file, ``[{"question_id", "answer"}]``;
    the file appears complete or not at all (written to a temporary file, then renamed)."""
    entries = []
    for question, answer in results.items():
        if isinstance(question, bool) or not isinstance(question, int) or not isinstance(answer, str):
            raise ValueError(f"a VQA result is an int question id and a str answer, got {question!r}: {answer!r}")
        entries.append({"question_id": question, "answer": answer})
    text = json.dumps(entries)

    def write(temp: str) -> None:
        Path(temp).write_text(text, encoding="utf-8")

    return atomic_write(path, write)


def read_vqa_results(path: str | Path) -> dict[int, str]:
    """Question id -> answer from an official result file; a malformed file or a question answered twice is a
    ValueError naming the file."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a JSON result file ({error})") from None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: a VQA result file is a JSON list, found {type(entries).__name__}")
    results: dict[int, str] = {}
    for index, entry in enumerate(entries):
        question = entry.get("question_id") if isinstance(entry, dict) else None
        answer = entry.get("answer") if isinstance(entry, dict) else None
        if isinstance(question, bool) or not isinstance(question, int) or not isinstance(answer, str):
            raise ValueError(f"{path}: entry {index} is not {{\"question_id\": int, \"answer\": str}}: {entry!r}")
        if question in results:
            raise ValueError(f"{path}: question {question} is answered twice (entries of one file must be unique)")
        results[question] = answer
    return results
