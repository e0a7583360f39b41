"""BLIP VQA model (``models/blip_vqa.py``): answers are generated, not classified (section 5.3).

The image-grounded encoder reads the question ([ENC] first) attending to the image; the answer
decoder ([DEC] first) attends to the question's states. Encoder and decoder have separate weights.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..config import BlipConfig
from ..text.tokenizer import with_first_token
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
