"""Caption and question cleaning, as the original ``data/utils.py`` (``pre_caption``, ``pre_question``)."""

from __future__ import annotations

import re

_CAPTION_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")
_RUNS_OF_SPACE = re.compile(r"\s{2,}")


def _check_text(text, what: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a string; got {type(text).__name__}")
    return text


def clean_caption(caption: str, max_words: int = 50) -> str:
    """Lower-case, punctuation ``.!"()*#:;~`` to spaces, collapse whitespace, keep ``max_words``."""
    caption = _CAPTION_PUNCTUATION.sub(" ", _check_text(caption, "caption").lower())
    caption = _RUNS_OF_SPACE.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def clean_question(question: str, max_words: int = 50) -> str:
    """Lower-case, punctuation ``.!"()*#:;~`` removed, trailing spaces dropped, keep ``max_words``."""
    question = _CAPTION_PUNCTUATION.sub("", _check_text(question, "question").lower())
    question = question.rstrip(" ")
    words = question.split(" ")
    if len(words) > max_words:
        question = " ".join(words[:max_words])
    return question
