"""BLIP pretraining model: ITC + ITM + LM in one forward (paper section 3.2, ``blip_pretrain.py``).

Order of one step, as the original:

1. clamp the temperature to [0.001, 0.5];
2. online features: image tokens, ITC image and text features;
3. momentum update (m = 0.995), then the momentum features, without gradient;
4. ITC with momentum distillation over batch + queue; enqueue the momentum features;
5. ITM: the positive pairs, then for every text a hard-negative image and for every image a
   hard-negative text, sampled from the in-batch ITC similarities; 3B rows through the head;
6. LM: the decoder reads the caption with [DEC] first, cross-attending to the image tokens.

Captions arrive tokenized (``input_ids`` starting with [CLS], ``attention_mask``), so no host
work happens inside the forward.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..config import BlipConfig
from .blip_matching import ImageTextMatchingModel
from .med import TextDecoder, share_all_but_self_attention


class BlipPretrain(ImageTextMatchingModel):
    task = "pretrain"

    def __init__(self, config: BlipConfig):
        super().__init__(config)
        self.text_decoder = TextDecoder(config.text, encoder_width=config.vision.width)
        share_all_but_self_attention(self.text_encoder, self.text_decoder)

        self.add_momentum_encoders()
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                alpha: float, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Returns ``{"itc": ..., "itm": ..., "lm": ...}`` for a batch of images and captions."""
        if input_ids.shape[0] != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {input_ids.shape[0]} captions")
        if images.shape[0] < 2:
            raise ValueError("pretraining needs at least 2 pairs per batch to draw hard negatives")
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)

        image_embeds = self.image_embeds(images)
        image_feat = self.image_features(image_embeds)
        text_feat = self.text_features(input_ids, attention_mask)

        with torch.no_grad():
            self.momentum_update()
            image_feat_m = nn.functional.normalize(self.vision_proj_m(self.visual_encoder_m(images)[:, 0]), dim=-1)
            text_m = self.text_encoder_m(input_ids, attention_mask)
            text_feat_m = nn.functional.normalize(self.text_proj_m(text_m[:, 0]), dim=-1)

        loss_itc, sim_i2t, sim_t2i = ops.itc_loss(image_feat, text_feat, image_feat_m, text_feat_m,
                                                  self.image_queue, self.text_queue, self.temp, alpha)
        self.enqueue(image_feat_m, text_feat_m)

        loss_itm = self.itm_loss(image_embeds, input_ids, attention_mask, sim_i2t, sim_t2i, generator)

        decoder_ids = input_ids.clone()
        decoder_ids[:, 0] = self.config.text.bos_token_id
        targets = decoder_ids.masked_fill(decoder_ids == self.config.text.pad_token_id, ops.IGNORE_INDEX)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=images.device)
        loss_lm = self.text_decoder.loss(decoder_ids, attention_mask, image_embeds, image_mask, targets,
                                         self.config.label_smoothing)
        return {"itc": loss_itc, "itm": loss_itm, "lm": loss_lm}

    @torch.no_grad()
    def enqueue(self, image_feat_m: torch.Tensor, text_feat_m: torch.Tensor) -> None:
        # both queues share one pointer: advance it once, after writing both
        ptr = self.queue_ptr.clone()
        ops.enqueue_(self.image_queue, ptr, image_feat_m)
        ops.enqueue_(self.text_queue, self.queue_ptr, text_feat_m)

    def itm_loss(self, image_embeds, input_ids, attention_mask, sim_i2t, sim_t2i, generator) -> torch.Tensor:
        batch = image_embeds.shape[0]
        enc_ids = self.with_enc(input_ids)
        with torch.no_grad():
            neg_image_for_text = ops.sample_hard_negatives(sim_t2i, generator=generator)  # (B,)
            neg_text_for_image = ops.sample_hard_negatives(sim_i2t, generator=generator)  # (B,)
        # rows: B positives, then B (text, negative image), then B (negative text, image)
        ids_all = torch.cat([enc_ids, enc_ids, enc_ids[neg_text_for_image]], dim=0)
        mask_all = torch.cat([attention_mask, attention_mask, attention_mask[neg_text_for_image]], dim=0)
        images_all = torch.cat([image_embeds, image_embeds[neg_image_for_text], image_embeds], dim=0)
        logits = self.itm_logits(images_all, ids_all, mask_all)
        return ops.itm_loss(logits, batch)
