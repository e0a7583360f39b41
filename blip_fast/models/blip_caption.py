"""BLIP captioner (``models/blip.py: BLIP_Decoder``): ViT + image-grounded text decoder.

Training minimises the LM loss of ``prompt + caption`` with the prompt's tokens excluded
(``decoder_targets[:, :prompt_length] = -100``). Generation starts from the tokenized prompt
with [DEC] in place of [CLS] and without the final [SEP].
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..config import BlipConfig
from ..text.tokenizer import with_first_token
from .generation import GenerationConfig, check_prompt, generate
from .med import TextDecoder
from .vit import VisionTransformer


class BlipCaption(nn.Module):
    task = "caption"

    def __init__(self, config: BlipConfig):
        super().__init__()
        self.config = config
        self.visual_encoder = VisionTransformer(config.vision)
        self.text_decoder = TextDecoder(config.text, encoder_width=config.vision.width)

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual_encoder(images)

    def decoder_inputs(self, input_ids: torch.Tensor) -> torch.Tensor:
        return with_first_token(input_ids, self.config.text.bos_token_id)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                prompt_length: int) -> torch.Tensor:
        """LM loss of tokenized ``prompt + caption`` ([CLS] first); the first ``prompt_length``
        tokens (``[CLS]`` + prompt) are context, not targets."""
        if input_ids.shape[0] != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {input_ids.shape[0]} captions")
        image_embeds = self.image_embeds(images)
        ids = self.decoder_inputs(input_ids)
        targets = ids.masked_fill(ids == self.config.text.pad_token_id, ops.IGNORE_INDEX)
        targets[:, :prompt_length] = ops.IGNORE_INDEX
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=images.device)
        return self.text_decoder.loss(ids, attention_mask, image_embeds, image_mask, targets,
                                      self.config.label_smoothing)

    @torch.no_grad()
    def generate(self, images: torch.Tensor, prompt_ids: torch.Tensor, generation: GenerationConfig,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Token ids (B, L) of captions, prompt included; ``prompt_ids`` is the tokenized prompt
        without its final [SEP], one row per image."""
        # before the ViT runs, and before decoder_inputs indexes the prompt's first column
        check_prompt(prompt_ids, generation)
        image_embeds = self.image_embeds(images)
        ids = self.decoder_inputs(prompt_ids)
        return generate(self.text_decoder, ids, image_embeds, None, generation,
                        self.config.text.sep_token_id, self.config.text.pad_token_id, generator)

    @torch.no_grad()
    def captions(self, images: torch.Tensor, generation: GenerationConfig, tokenizer,
                 generator: torch.Generator | None = None) -> list[str]:
        """Caption texts of ``images`` (``generation.num_return_sequences`` per image, image by image), as the
        original ``BLIP_Decoder.generate``: the prompt (``config.prompt``,
        tokenized by ``tokenizer`` without its [SEP]) starts every caption and counts towards ``max_length``; the
        decoded text loses the prompt's characters."""
        prompt_ids = self.prompt_ids(tokenizer, generation).repeat(images.shape[0], 1).to(images.device)
        ids = self.generate(images, prompt_ids, generation, generator)
        return [text[len(self.config.prompt):] for text in tokenizer.batch_decode(ids)]

    def prompt_ids(self, tokenizer, generation: GenerationConfig) -> torch.Tensor:
        """(1, P) ids of the prompt as generation starts from it ([CLS] + prompt, no [SEP]), checked to leave room
        for a caption within ``max_length``, which counts the prompt."""
        prompt = self.config.prompt
        ids = tokenizer([prompt]).input_ids[:, :-1]
        if generation.max_length <= ids.shape[1]:
            raise ValueError(f"max_length ({generation.max_length}) counts the prompt {prompt!r}, which is "
                             f"{ids.shape[1]} tokens: it must be at least {ids.shape[1] + 1}")
        return ids
