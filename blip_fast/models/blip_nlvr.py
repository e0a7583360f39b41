"""BLIP for NLVR2 (``models/blip_nlvr.py``, paper section 5.4): is a statement true of a pair of images?

Both images go through the shared ViT. The image-grounded text encoder reads the statement ([ENC] first), and in
every layer its cross-attention has two branches, one per image (``crossattention.self0`` / ``self1``): their
outputs are averaged in the first :data:`MERGE_FROM_LAYER` layers and mixed by a learned linear layer
(``merge_layer``) from there on, as the original ``nlvr_encoder.py``. A two-layer MLP on the [ENC] state says
false / true. From a pretrained checkpoint both branches start as the one pretrained cross-attention
(blip_fast.checkpoint.transfer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import BlipConfig, TextConfig
from ..text.tokenizer import with_first_token
from .med import PaddedRows, SelfAttentionProjections, TextTransformer
from .vit import VisionTransformer

# the original's nlvr_encoder.BertSelfOutput merges with a learned layer in layers 6 and later, whatever the depth
MERGE_FROM_LAYER = 6


class TwinOutput(nn.Module):
    """The two branches' attention outputs projected (``dense0`` / ``dense1``), averaged or merged, residual."""

    def __init__(self, config: TextConfig, merge: bool):
        super().__init__()
        self.dense0 = nn.Linear(config.hidden_size, config.hidden_size)
        self.dense1 = nn.Linear(config.hidden_size, config.hidden_size)
        if merge:
            self.merge_layer = nn.Linear(2 * config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, attended: tuple[torch.Tensor, torch.Tensor], residual: torch.Tensor) -> torch.Tensor:
        first, second = self.dense0(attended[0]), self.dense1(attended[1])
        if hasattr(self, "merge_layer"):
            mixed = self.merge_layer(torch.cat([first, second], dim=-1))
        else:
            mixed = (first + second) / 2
        return self.LayerNorm(self.dropout(mixed) + residual)


class TwinImageAttention(nn.Module):
    """Cross-attention to two images: one set of projections per image (``self0``, ``self1``), one output."""

    def __init__(self, config: TextConfig, encoder_width: int, merge: bool):
        super().__init__()
        self.self0 = SelfAttentionProjections(config, encoder_width)
        self.self1 = SelfAttentionProjections(config, encoder_width)
        self.output = TwinOutput(config, merge)
        self.dropout_p = config.attention_dropout

    def forward(self, x: torch.Tensor, images: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``x`` (B, L, hidden) attends to each image's tokens (B, N, width), every token valid."""
        dropout_p = self.dropout_p if self.training else 0.0
        attended = []
        for projections, image in zip((self.self0, self.self1), images, strict=True):
            q, k, v = (projections.heads(linear(t)) for linear, t in
                       ((projections.query, x), (projections.key, image), (projections.value, image)))
            attended.append(ops.attention(q, k, v, None, False, dropout_p).transpose(1, 2).flatten(2))
        return self.output(tuple(attended), x)


class ImagePairRows(PaddedRows):
    """:class:`~blip_fast.models.med.PaddedRows` whose context is the pair of images' tokens."""

    def attend_context(self, crossattention: TwinImageAttention, x: torch.Tensor) -> torch.Tensor:
        return crossattention(x, self.context)


class BlipNLVR(nn.Module):
    task = "nlvr"

    def __init__(self, config: BlipConfig):
        super().__init__()
        self.config = config
        self.visual_encoder = VisionTransformer(config.vision)
        self.text_encoder = TextTransformer(config.text, encoder_width=None)
        for index, layer in enumerate(self.text_encoder.encoder.layer):
            layer.crossattention = TwinImageAttention(config.text, config.vision.width, index >= MERGE_FROM_LAYER)
        self.text_encoder.reset_parameters()  # BERT's init over the branches too, as the original's init_weights
        hidden = config.text.hidden_size
        # torch's default Linear init here, as the original (its cls_head is outside the BERT model)
        self.cls_head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2))

    def logits(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, 2) [false, true] logits; ``images`` (2B, 3, S, S): every pair's first images, then their second
        images (the original's ``torch.cat([image0, image1])``); ``input_ids`` (B, L), [CLS] first."""
        if images.shape[0] != 2 * input_ids.shape[0]:
            raise ValueError(f"{images.shape[0]} images for {input_ids.shape[0]} statements: NLVR2 takes two "
                             "images per statement, all first images then all second images")
        pair = self.visual_encoder(images).chunk(2)
        ids = with_first_token(input_ids, self.config.text.enc_token_id)
        encoder = self.text_encoder
        x = encoder.embeddings(ids)
        padding_mask = attention_mask.bool()
        for index, layer in enumerate(encoder.encoder.layer):
            x = layer(x, ImagePairRows(padding_mask, False, pair, None, None, index))
        return self.cls_head(x[:, 0])

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the statements' labels ``targets`` (B,), 1 = true."""
        return F.cross_entropy(self.logits(images, input_ids, attention_mask).float(), targets)
