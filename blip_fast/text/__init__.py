"""Text side: the BLIP tokenizer and the original caption/question cleaning."""

from .clean import clean_caption, clean_question
from .tokenizer import BlipTokenizer, TokenizedText, with_first_token

__all__ = ["BlipTokenizer", "TokenizedText", "clean_caption", "clean_question", "with_first_token"]
