"""The ITC/ITM part shared by BLIP's pretraining and retrieval models.

* ITC features: the [CLS] states of the ViT and of the unimodal text encoder, projected to
  ``embed_dim`` and L2-normalised; their dot products divided by the learned temperature are the
  contrastive logits.
* ITM: the image-grounded text encoder reads the caption with [ENC] in place of [CLS] and
  cross-attends to the image tokens; a linear head on its first state says match / no match.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import BlipConfig
from ..text.tokenizer import with_first_token
from .fast_passes import BlockContext
from .med import TextTransformer
from .packing import PackedText
from .vit import VisionTransformer


class ImageTextMatchingModel(nn.Module):
    def __init__(self, config: BlipConfig):
        super().__init__()
        self.config = config
        self.visual_encoder = VisionTransformer(config.vision)
        self.text_encoder = TextTransformer(config.text, encoder_width=config.vision.width)
        self.vision_proj = nn.Linear(config.vision.width, config.embed_dim)
        self.text_proj = nn.Linear(config.text.hidden_size, config.embed_dim)
        self.itm_head = nn.Linear(config.text.hidden_size, 2)
        self.temp = nn.Parameter(torch.tensor(config.temp))

    def add_momentum_encoders(self) -> None:
        """Frozen EMA twins of both encoders and projections, and queues of their past features
        (ALBEF / BLIP section 3.2), for pretraining and retrieval fine-tuning."""
        self.visual_encoder_m = momentum_copy(self.visual_encoder)
        self.vision_proj_m = momentum_copy(self.vision_proj)
        self.text_encoder_m = momentum_copy(self.text_encoder)
        self.text_proj_m = momentum_copy(self.text_proj)
        self.register_buffer("image_queue", normalized_queue(self.config.embed_dim, self.config.queue_size))
        self.register_buffer("text_queue", normalized_queue(self.config.embed_dim, self.config.queue_size))

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [
            (self.visual_encoder, self.visual_encoder_m),
            (self.vision_proj, self.vision_proj_m),
            (self.text_encoder, self.text_encoder_m),
            (self.text_proj, self.text_proj_m),
        ]

    @torch.no_grad()
    def momentum_update(self) -> None:
        """``p_m <- m * p_m + (1 - m) * p`` for every momentum parameter, through the ops layer."""
        online, momentum = [], []
        for model, model_m in self.momentum_pairs():
            online += list(model.parameters())
            momentum += list(model_m.parameters())
        ops.momentum_update_(momentum, online, self.config.momentum)

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """Image tokens (B, 1 + patches, width) of the ViT."""
        return self.visual_encoder(images)

    def image_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Normalised ITC image features (B, embed_dim) from the image tokens."""
        return F.normalize(self.vision_proj(image_embeds[:, 0, :]), dim=-1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      packing: PackedText | None = None) -> torch.Tensor:
        """Normalised ITC text features (B, embed_dim) from the unimodal encoder ([CLS] first)."""
        return F.normalize(self.text_proj(first_states(self.text_encoder, input_ids, attention_mask, packing)), dim=-1)

    def image_keys_values(self, image_embeds: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each text layer's cross-attention keys and values (B, H, N, D) of the image tokens.

        Computed once, they serve every text pass over the same images: rows are picked along
        dim 0 (``k[index]``) instead of projecting repeated image tokens again.
        """
        return self.text_encoder.context_keys_values(image_embeds)

    def itm_logits(self, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        """ITM logits (B, 2) [no match, match]; ``input_ids`` start with [ENC] (see :meth:`with_enc`)."""
        return self.itm_logits_from_keys_values(self.image_keys_values(image_embeds), input_ids, attention_mask)

    def itm_logits_from_keys_values(self, image_kv: list[tuple[torch.Tensor, torch.Tensor] | BlockContext],
                                    input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                    packing: PackedText | None = None) -> torch.Tensor:
        """:meth:`itm_logits` with the images given by :meth:`image_keys_values` (every image token valid), per
        layer as the rows' (k, v) or as a :class:`~blip_fast.models.fast_passes.BlockContext`."""
        return self.itm_head(first_states(self.text_encoder, input_ids, attention_mask, packing, context_kv=image_kv))

    def with_enc(self, input_ids: torch.Tensor) -> torch.Tensor:
        """A copy of tokenized captions with [ENC] in place of [CLS]."""
        return with_first_token(input_ids, self.config.text.enc_token_id)


def first_states(encoder: TextTransformer, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 packing: PackedText | None = None, **context) -> torch.Tensor:
    """The last hidden state (B, hidden) of each caption's first token ([CLS] / [ENC]), padded or packed."""
    return first_rows(encoder(input_ids, attention_mask, packing=packing, **context), packing)


def first_rows(states: torch.Tensor, packing: PackedText | None = None) -> torch.Tensor:
    """Each caption's first state (B, hidden) of a text transformer's output, padded (B, L, hidden) or packed."""
    return states[:, 0, :] if packing is None else packing.first_rows(states)


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen copy of ``module`` with the same values (the original ``copy_params``)."""
    twin = copy.deepcopy(module)
    for param in twin.parameters():
        param.requires_grad_(False)
    return twin


def normalized_queue(dim: int, size: int) -> torch.Tensor:
    """Random unit columns (dim, size): the original queue initialisation."""
    return F.normalize(torch.randn(dim, size), dim=0)
