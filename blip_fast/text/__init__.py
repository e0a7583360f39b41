"""Text side: the BLIP tokenizer and the original caption/question cleaning."""

from .clean import clean_caption, clean_question
from .tokenizer import BlipTokenizer, TokenizedText

__all__ = ["BlipTokenizer", "TokenizedText", "clean_caption", "clean_question"]
