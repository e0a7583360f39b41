"""Tokenizer and caption cleaning: same ids as transformers' BertTokenizer + BLIP's special tokens."""

import pytest
import torch
from transformers import BertTokenizer

from blip_fast.shapes import FINETUNE_TEXT_LENGTH, PRETRAIN_TEXT_LENGTH, VOCAB_SIZE
from blip_fast.text import BlipTokenizer, clean_caption, clean_question, with_first_token
from blip_fast.text.tokenizer import VOCAB_FILE

TEXTS = [
    "A picture of a Dog!",
    "Café naïve résumé 東京 hello-world",
    "two  blue circles,\tone red square;   and a (tiny) triangle...",
    "x",
    "a " * 60,
    "unbelievably hyperparameterized transformers",
    "[DEC] and [ENC] are special",
]


@pytest.fixture(scope="module")
def tokenizers():
    theirs = BertTokenizer(str(VOCAB_FILE))
    theirs.add_special_tokens({"bos_token": "[DEC]"})
    theirs.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return BlipTokenizer(), theirs


@pytest.mark.parametrize("max_length", [5, PRETRAIN_TEXT_LENGTH, FINETUNE_TEXT_LENGTH, 512])
def test_ids_match_transformers_bert_tokenizer(tokenizers, max_length):
    ours, theirs = tokenizers
    a = ours(TEXTS, max_length=max_length)
    b = theirs(TEXTS, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    assert torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(a.attention_mask, b.attention_mask)


def test_special_tokens(tokenizers):
    ours, theirs = tokenizers
    assert len(ours) == VOCAB_SIZE
    assert (ours.bos_token_id, ours.enc_token_id) == (30522, 30523)
    assert theirs.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [30522, 30523]
    ids = ours(["[DEC] [ENC]"]).input_ids[0].tolist()
    assert ids == [101, 30522, 30523, 102]


def test_with_first_token_replaces_cls_in_a_copy():
    ids = torch.tensor([[101, 7, 102], [101, 102, 0]])
    assert with_first_token(ids, 30523).tolist() == [[30523, 7, 102], [30523, 102, 0]]
    assert ids[:, 0].tolist() == [101, 101]


def test_padding_modes_and_decode(tokenizers):
    ours, _ = tokenizers
    fixed = ours(["a dog", "a cat on a mat"], max_length=30, padding="max_length")
    assert fixed.input_ids.shape == (2, 30)
    assert fixed.attention_mask[0].sum() == 4
    assert ours.decode(fixed.input_ids[1]) == "a cat on a mat"
    assert ours.batch_decode(fixed.input_ids) == ["a dog", "a cat on a mat"]


def test_bad_inputs_are_clear_errors(tokenizers):
    ours, _ = tokenizers
    with pytest.raises(ValueError, match="empty list"):
        ours([])
    with pytest.raises(TypeError, match="text 1 is a int"):
        ours(["fine", 3])
    with pytest.raises(ValueError, match="padding must be"):
        ours(["a"], padding="right")
    with pytest.raises(FileNotFoundError):
        BlipTokenizer("/nonexistent/vocab.txt")


def test_clean_caption_follows_the_original():
    assert clean_caption("A Dog.  Running!! (fast)\n") == "a dog running fast"
    assert clean_caption("one two three four", max_words=2) == "one two"
    assert clean_caption("#tag: ~x;y*") == "tag x y"
    assert clean_caption("   ") == ""
    with pytest.raises(TypeError, match="caption must be a string"):
        clean_caption(None)


def test_clean_question_follows_the_original():
    assert clean_question("What color is the Dog?") == "what color is the dog?"
    assert clean_question("Is it (really) red.  ") == "is it really red"
    assert clean_question("a b c d", max_words=3) == "a b c"
