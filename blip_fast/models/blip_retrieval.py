"""BLIP retrieval model (``models/blip_retrieval.py``): ITC features and ITM scores.

Retrieval ranks with ITC similarities, then re-ranks the top k with the ITM head (paper section
5.1). The model carries the momentum encoders and queues of retrieval fine-tuning (with the image
ids queue ``idx_queue``) so that fine-tuning checkpoints load whole.
"""

from __future__ import annotations

import torch

from ..config import BlipConfig
from .blip_matching import ImageTextMatchingModel


class BlipRetrieval(ImageTextMatchingModel):
    task = "retrieval"

    def __init__(self, config: BlipConfig):
        super().__init__(config)
        self.add_momentum_encoders()
        self.register_buffer("idx_queue", torch.full((1, config.queue_size), -100, dtype=torch.long))
        self.register_buffer("ptr_queue", torch.zeros(1, dtype=torch.long))

    def similarity(self, image_feat: torch.Tensor, text_feat: torch.Tensor) -> torch.Tensor:
        """ITC cosine similarities (num_images, num_texts) of normalised features."""
        return image_feat @ text_feat.t()

    def match_probability(self, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor) -> torch.Tensor:
        """ITM probability that each (image, caption) row pair matches; ids start with [CLS]."""
        logits = self.itm_logits(image_embeds, self.with_enc(input_ids), attention_mask)
        return logits.float().softmax(dim=-1)[:, 1]
