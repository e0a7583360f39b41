"""BLIP VQA model (``models/blip_vqa.py``): answers are generated, not classified (section 5.3).

The image-grounded encoder reads the question ([ENC] first) attending to the image; the answer
decoder ([DEC] first) attends to the question's states. Encoder and decoder have separate weights.

At test time an answer is either generated (:meth:`BlipVQA.generate`) or picked from a list of
candidate answers (:meth:`BlipVQA.rank_answers`, the original's ``rank_answer``): the decoder's
first-token distribution shortlists ``k`` candidates, and of those the one whose whole answer the
decoder scores best wins (:meth:`BlipVQA.score_answers` gives the shortlist and the scores).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .. import ops
from ..config import BlipConfig
from ..text.tokenizer import BlipTokenizer, TokenizedText, with_first_token
from .generation import GenerationConfig, generate
from .med import TextDecoder, TextTransformer
from .vit import VisionTransformer


class BlipVQA(nn.Module):
    task = "vqa"

    def __init__(self, config: BlipConfig):
        super().__init__()
        self.config = config
        self.visual_encoder = VisionTransformer(config.vision)
        self.text_encoder = TextTransformer(config.text, encoder_width=config.vision.width)
        self.text_decoder = TextDecoder(config.text, encoder_width=config.text.hidden_size)

    def question_states(self, images: torch.Tensor, question_ids: torch.Tensor,
                        question_mask: torch.Tensor) -> torch.Tensor:
        """States (B, Lq, hidden) of the tokenized questions ([CLS] first; replaced by [ENC])."""
        if question_ids.shape[0] != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {question_ids.shape[0]} questions")
        image_embeds = self.visual_encoder(images)
        ids = with_first_token(question_ids, self.config.text.enc_token_id)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=images.device)
        return self.text_encoder(ids, question_mask, image_embeds, image_mask)

    def forward(self, images, question_ids, question_mask, answer_ids, answer_mask, weights,
                answers_per_question) -> torch.Tensor:
        """Weighted answer LM loss: each question has ``answers_per_question[i]`` answers (rows of
        ``answer_ids``, [CLS] first) with ``weights``; summed per answer, averaged over images."""
        states = self.question_states(images, question_ids, question_mask)
        counts = torch.as_tensor(answers_per_question, device=states.device)
        states = states.repeat_interleave(counts, dim=0)
        mask = question_mask.repeat_interleave(counts, dim=0)
        ids = with_first_token(answer_ids, self.config.text.bos_token_id)
        targets = ids.masked_fill(ids == self.config.text.pad_token_id, ops.IGNORE_INDEX)
        per_answer = self.text_decoder.loss(ids, answer_mask, states, mask, targets, self.config.label_smoothing,
                                            reduction="sum_per_sample")
        return (weights * per_answer).sum() / images.shape[0]

    @torch.no_grad()
    def generate(self, images, question_ids, question_mask, generation: GenerationConfig) -> torch.Tensor:
        """Answer token ids (B, L), [DEC] first. Like the original, the decoder attends to every
        question position (padding included)."""
        states = self.question_states(images, question_ids, question_mask)
        start = torch.full((states.shape[0], 1), self.config.text.bos_token_id, dtype=torch.long,
                           device=states.device)
        return generate(self.text_decoder, start, states, None, generation,
                        self.config.text.sep_token_id, self.config.text.pad_token_id)

    @torch.no_grad()
    def rank_answers(self, images, question_ids, question_mask, answer_ids, answer_mask, k: int = 128,
                     max_rows: int = 1024) -> torch.Tensor:
        """Index (B,) into the candidate answers ``answer_ids`` (A, La) of each question's answer: of the ``k``
        candidates :meth:`score_answers` shortlists, the best-scored one (the first of equals, in shortlist
        order), as the original ``rank_answer``."""
        candidates, scores = self.score_answers(images, question_ids, question_mask, answer_ids, answer_mask, k,
                                                max_rows)
        return candidates.gather(1, scores.argmax(dim=1, keepdim=True)).squeeze(1)

    @torch.no_grad()
    def score_answers(self, images, question_ids, question_mask, answer_ids, answer_mask, k: int = 128,
                      max_rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        """Each question's shortlist of candidate answers, (B, k) indices into ``answer_ids`` (A, La) /
        ``answer_mask``, and their scores (B, k), as the original ``rank_answer`` computes them:

        1. the decoder reads [DEC] alone; each candidate's first token gets its probability there, and the
           ``k`` most probable candidates of each question are kept, most probable first (all of them when
           ``k >= A``);
        2. each kept candidate is scored whole: minus its LM loss summed over its tokens, [SEP] included
           (the first, [DEC], is only read), with the training loss's label smoothing, as the original's
           ``reduction='none'`` loss has it -- a log-likelihood when ``config.label_smoothing`` is 0.

        ``answer_ids`` rows start with [CLS] or [DEC] (the first token is set to [DEC]; see
        :func:`tokenize_answer_list`). The decoder attends to the question's real tokens (``question_mask``),
        not to its padding. Candidates are scored for as many questions at once as keep the rows of one
        decoder pass within ``max(k, max_rows)``: each row holds its question's cross-attention keys and values
        of every layer (for BLIP-base, 35 question tokens, bf16: 1.3 MB a row).
        """
        if k < 1 or max_rows < 1:
            raise ValueError(f"k and max_rows must be at least 1; got {k} and {max_rows}")
        if answer_ids.shape != answer_mask.shape or answer_ids.dim() != 2 or answer_ids.shape[1] < 2:
            raise ValueError(f"answer_ids {tuple(answer_ids.shape)} and answer_mask {tuple(answer_mask.shape)} must "
                             "be the same (A, La) with La >= 2: a first token, then the answer")
        text = self.config.text
        states = self.question_states(images, question_ids, question_mask)
        answer_ids = with_first_token(answer_ids, text.bos_token_id)
        k = min(k, answer_ids.shape[0])
        # the question's keys/values are projected once, then picked for each of its k candidates' rows
        context_kv = self.text_decoder.bert.context_keys_values(states)
        questions = states.shape[0]
        start = torch.full((questions, 1), text.bos_token_id, dtype=torch.long, device=states.device)
        hidden = self.text_decoder.hidden_states(start, None, None, question_mask, context_kv=context_kv)
        first_token = self.text_decoder.logits(hidden[:, 0]).float().softmax(dim=-1)  # (B, V)
        # ranked by probability, not logit, as the original: equal logits could round to unequal probabilities
        candidates = first_token.index_select(1, answer_ids[:, 1]).topk(k, dim=1).indices  # (B, k)
        targets = answer_ids.masked_fill(answer_ids == text.pad_token_id, ops.IGNORE_INDEX)
        per_pass = max(1, max_rows // k)
        scores = []
        for first in range(0, questions, per_pass):
            last = min(first + per_pass, questions)
            picked = candidates[first:last].reshape(-1)  # question-major: a question's k, then the next's
            rows = torch.arange(first, last, device=states.device).repeat_interleave(k)
            loss = self.text_decoder.loss(answer_ids[picked], answer_mask[picked], None, question_mask[rows],
                                          targets[picked], self.config.label_smoothing, "sum_per_sample",
                                          context_kv=[(keys[rows], values[rows]) for keys, values in context_kv])
            scores.append(-loss.float().view(-1, k))
        return candidates, torch.cat(scores)


def tokenize_answer_list(answers: Sequence[str], max_length: int,
                         tokenizer: BlipTokenizer | None = None) -> TokenizedText:
    """The candidate answers of :meth:`BlipVQA.rank_answers` as the original's evaluation tokenizes its answer list:
    [DEC] first, [SEP] last, padded to the longest. The original does not truncate; an answer longer than
    ``max_length`` tokens (the decoder's positions) is an error here rather than a different, shorter answer."""
    if isinstance(answers, str):
        raise TypeError("answers must be a list of strings, not one string")
    tokenizer = tokenizer or BlipTokenizer()
    tokens = tokenizer(list(answers), max_length=max_length + 1)  # one token more: a truncated row shows
    lengths = tokens.attention_mask.sum(dim=1)
    if int(lengths.max()) > max_length:
        index = int(lengths.argmax())
        raise ValueError(f"answer {index} ({answers[index][:80]!r}) is longer than {max_length} tokens")
    return TokenizedText(with_first_token(tokens.input_ids, tokenizer.bos_token_id), tokens.attention_mask)
