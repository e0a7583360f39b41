"""BLIP's tokenizer: BERT base uncased WordPiece plus [DEC] (30522) and [ENC] (30523).

Built with the ``tokenizers`` library from the vocabulary file shipped inside the package, so
nothing is downloaded. Same normalisation and splitting as ``BertTokenizerFast`` (the original
``init_tokenizer`` adds ``[DEC]`` as bos token and ``[ENC]`` as an additional special token).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import BertWordPieceTokenizer

VOCAB_FILE = Path(__file__).with_name("bert-base-uncased-vocab.txt")


@dataclass
class TokenizedText:
    input_ids: torch.Tensor
    """(B, L) long, [CLS] first, [SEP] last, padding 0."""
    attention_mask: torch.Tensor
    """(B, L) long, 1 for real tokens."""


def with_first_token(ids: torch.Tensor, token: int) -> torch.Tensor:
    """A copy of tokenized text ``ids`` (B, L) with ``token`` in place of each row's first ([CLS]): [ENC] for the
    image-grounded encoder, [DEC] for the decoder (the original's ``ids = text.input_ids.clone(); ids[:, 0] = ...``)."""
    ids = ids.clone()
    ids[:, 0] = token
    return ids


class BlipTokenizer:
    pad_token_id = 0
    cls_token_id = 101
    sep_token_id = 102
    bos_token_id = 30522  # [DEC]
    enc_token_id = 30523  # [ENC]

    def __init__(self, vocab_file: str | Path = VOCAB_FILE):
        vocab_file = Path(vocab_file)
        if not vocab_file.is_file():
            raise FileNotFoundError(f"vocabulary file not found: {vocab_file}")
        self._tokenizer = BertWordPieceTokenizer(str(vocab_file), lowercase=True)
        self._tokenizer.add_special_tokens(["[DEC]", "[ENC]"])
        if (self._tokenizer.token_to_id("[DEC]"), self._tokenizer.token_to_id("[ENC]")) != (30522, 30523):
            raise ValueError(f"{vocab_file} is not the 30,522-entry BERT uncased vocabulary")

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size()

    def __call__(self, texts: list[str], max_length: int = 30, padding: str = "longest") -> TokenizedText:
        """Tokenize, truncate to ``max_length`` (keeping [SEP]) and pad (``longest`` or ``max_length``)."""
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) == 0:
            raise ValueError("cannot tokenize an empty list of texts")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {i} is a {type(text).__name__}, not a string")
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length'; got {padding!r}")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 ([CLS] and [SEP]); got {max_length}")
        self._tokenizer.enable_truncation(max_length)
        if padding == "max_length":
            self._tokenizer.enable_padding(pad_id=self.pad_token_id, length=max_length)
        else:
            self._tokenizer.enable_padding(pad_id=self.pad_token_id)
        encodings = self._tokenizer.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return TokenizedText(ids, mask)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, rows, skip_special_tokens: bool = True) -> list[str]:
        if isinstance(rows, torch.Tensor):
            rows = rows.tolist()
        return self._tokenizer.decode_batch(rows, skip_special_tokens=skip_special_tokens)
