"""BLIP pretraining model: ITC + ITM + LM in one forward (paper section 3.2, ``blip_pretrain.py``).

Order of one step, as the original:

1. clamp the temperature to [0.001, 0.5];
2. online features: image tokens, ITC image and text features;
3. momentum update (m = 0.995), then the momentum features, without gradient;
4. ITC with momentum distillation over batch + queue; enqueue the momentum features (of every
   rank, when distributed);
5. ITM: the positive pairs, then for every text a hard-negative image and for every image a
   hard-negative text, sampled from the in-batch ITC similarities; 3B rows through the head;
6. LM: the decoder reads the caption with [DEC] first, cross-attending to the image tokens.

Steps 5 and 6 run their text passes layer by layer together by default (``joint_grounded_passes``,
:func:`~blip_fast.models.fast_passes.joint_text_passes`): the same losses, with the ITM and LM rows through each weight
the encoder and decoder share as one batch.

Captions arrive tokenized (``input_ids`` starting with [CLS], ``attention_mask``), so no host
work happens inside the forward.

Steps 1 and 3 write parameters in place. Under FSDP2 the parameters a forward sees are transient
unsharded copies, so those writes would be lost; the trainer then sets ``updates_in_forward =
False`` and runs both on the sharded parameters before the forward (blip_fast.train.fsdp). Neither
reads anything the forward computes, so the result is the same.

The image tokens reach ITM and LM only through each text layer's cross-attention keys and values,
and the decoder shares the encoder's cross-attention. So they are projected once, for B images,
and the 3B ITM rows read theirs from those B, where the original projects 3B + B image-token
rows. With N image tokens of width W, text width C and L layers, one K and one V projection cost
``4 N W C`` FLOPs per image and layer forward and twice that backward (input and weight
gradients). Projecting B rows instead of 4B saves ``3B * 4 N W C * L`` forward and three times
that in all: ``36 B N W C L`` FLOPs a step, 50 GFLOPs per pair for BLIP base at 224 px (N = 197,
W = C = 768, L = 12), with the same result up to the summation order of the gradients. Nor are the projected keys and
values copied per ITM row: the positive and the negative-text rows of an image share its rows
(``BlockContext``), and only the B negative-image rows are gathered.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.profiler import record_function

from .. import ops
from ..config import BlipConfig
from ..text.tokenizer import with_first_token
from .blip_matching import ImageTextMatchingModel, first_rows, first_states
from .fast_passes import BlockContext, TextPass, joint_text_passes
from .med import TextDecoder, share_all_but_self_attention
from .packing import PackedText


class BlipPretrain(ImageTextMatchingModel):
    task = "pretrain"
    updates_in_forward = True
    """Clamp the temperature and run the momentum update inside :meth:`forward`, as the original
    (False: the caller does both before each forward, see the module docstring)."""
    joint_grounded_passes = True
    """Run ITM's and LM's text passes layer by layer together (:func:`~blip_fast.models.fast_passes.joint_text_passes`):
    the same losses; False: one after the other, as the original."""

    def __init__(self, config: BlipConfig):
        super().__init__(config)
        self.text_decoder = TextDecoder(config.text, encoder_width=config.vision.width)
        share_all_but_self_attention(self.text_encoder, self.text_decoder)

        self.add_momentum_encoders()
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                alpha: float, generator: torch.Generator | None = None,
                packing: PackedText | None = None) -> dict[str, torch.Tensor]:
        """Returns ``{"itc": ..., "itm": ..., "lm": ...}`` for a batch of images and captions.

        ``packing`` (:meth:`PackedText.from_mask` of ``attention_mask``, made on the host) runs the text passes
        on the captions' real tokens only; the losses are the same.
        """
        if input_ids.shape[0] != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {input_ids.shape[0]} captions")
        if images.shape[0] < 2:
            raise ValueError("pretraining needs at least 2 pairs per batch to draw hard negatives")
        batch = images.shape[0]
        if self.updates_in_forward:
            self.clamp_temperature_()

        # record_function names the phases in a torch.profiler trace (benchmarks/bench_step.py --profile)
        with record_function("blip.unimodal"):
            image_embeds = self.image_embeds(images)
            image_feat = self.image_features(image_embeds)
            text_feat = self.text_features(input_ids, attention_mask, packing)

        with torch.no_grad():
            if self.updates_in_forward:
                with record_function("blip.momentum_update"):
                    self.momentum_update()
            with record_function("blip.momentum_forward"):
                image_feat_m = nn.functional.normalize(self.vision_proj_m(self.visual_encoder_m(images)[:, 0]), dim=-1)
                text_m = first_states(self.text_encoder_m, input_ids, attention_mask, packing)
                text_feat_m = nn.functional.normalize(self.text_proj_m(text_m), dim=-1)

        with record_function("blip.itc"):
            loss_itc, sim_i2t, sim_t2i = ops.itc_loss(image_feat, text_feat, image_feat_m, text_feat_m,
                                                      self.image_queue, self.text_queue, self.temp, alpha)
            self.enqueue(image_feat_m, text_feat_m)

        with record_function("blip.itm"):
            # one projection of the image tokens for both image-grounded passes (the decoder shares the encoder's
            # cross-attention modules, hence its keys/values)
            image_kv = self.image_keys_values(image_embeds)  # per layer (k, v), each (B, H, N, D)
            itm = self.itm_rows(image_kv, input_ids, attention_mask, sim_i2t, sim_t2i, generator, packing)
        decoder_ids = with_first_token(input_ids, self.config.text.bos_token_id)
        lm = TextPass(self.text_decoder.bert, decoder_ids, attention_mask, True, packing)
        targets = decoder_ids.masked_fill(decoder_ids == self.config.text.pad_token_id, ops.IGNORE_INDEX)
        if self.joint_grounded_passes:
            with record_function("blip.itm_lm"):
                # the last B rows, the LM's captions, attend to their own images
                contexts = [BlockContext(context.segments + ((k, v, 1, None),))
                            for context, (k, v) in zip(itm.contexts, image_kv, strict=True)]
                itm_states, lm_states = joint_text_passes([itm.text, lm], contexts)
                loss_itm = ops.itm_loss(self.itm_head(first_rows(itm_states, itm.text.packing)), batch)
                loss_lm = self.text_decoder.loss_of_hidden(self.text_decoder.cls.predictions.hidden(lm_states),
                                                           targets, self.config.label_smoothing, packing=packing)
            return {"itc": loss_itc, "itm": loss_itm, "lm": loss_lm}
        with record_function("blip.itm"):
            loss_itm = ops.itm_loss(self.itm_logits_from_keys_values(itm.contexts, itm.text.input_ids,
                                                                     itm.text.attention_mask, itm.text.packing), batch)
        with record_function("blip.lm"):
            loss_lm = self.text_decoder.loss(decoder_ids, attention_mask, None, None, targets,
                                             self.config.label_smoothing, context_kv=image_kv, packing=packing)
        return {"itc": loss_itc, "itm": loss_itm, "lm": loss_lm}

    @torch.no_grad()
    def clamp_temperature_(self) -> None:
        """Step 1: keep the ITC temperature in [0.001, 0.5] (the original clamps it at every forward)."""
        self.temp.clamp_(0.001, 0.5)

    @torch.no_grad()
    def enqueue(self, image_feat_m: torch.Tensor, text_feat_m: torch.Tensor) -> None:
        """Write the momentum features (B, D) into the queues; distributed, those of every rank."""
        image_feat_m, text_feat_m = gather_momentum_features(image_feat_m, text_feat_m)
        # both queues share one pointer: advance it once, after writing both
        ptr = self.queue_ptr.clone()
        ops.enqueue_(self.image_queue, ptr, image_feat_m)
        ops.enqueue_(self.text_queue, self.queue_ptr, text_feat_m)

    def itm_rows(self, image_kv, input_ids, attention_mask, sim_i2t, sim_t2i, generator,
                 packing: PackedText | None = None) -> ItmRows:
        """ITM's 3B rows: B positives (text i, image i), B (negative text, image i), then B (text j, negative
        image), the negatives drawn from the in-batch ITC similarities; the images as their per-layer keys/values
        (:meth:`image_keys_values`)."""
        batch = input_ids.shape[0]
        enc_ids = self.with_enc(input_ids)
        with torch.no_grad():
            neg_image_for_text = ops.sample_hard_negatives(sim_t2i, generator=generator)  # (B,)
            neg_text_for_image = ops.sample_hard_negatives(sim_i2t, generator=generator)  # (B,)
        ids_all = torch.cat([enc_ids, enc_ids[neg_text_for_image], enc_ids], dim=0)
        mask_all = torch.cat([attention_mask, attention_mask[neg_text_for_image], attention_mask], dim=0)
        # the first 2B rows attend to each image's own keys/values, stacked two to an image (BlockContext),
        # the last B to the negative images' rows: per layer B + B rows of keys/values instead of 3B copied
        contexts = [BlockContext(((k, v, 2, None), (k, v, 1, neg_image_for_text)))
                    for k, v in image_kv]
        if packing is not None:
            # the negative texts are drawn on the device, so the host cannot count their tokens: their rows keep
            # their padding (every position a token); the positive and negative-image rows are packed
            dense = PackedText.dense(batch, input_ids.shape[1], input_ids.device)
            packing = PackedText.concat([packing, dense, packing])
        return ItmRows(TextPass(self.text_encoder, ids_all, mask_all, False, packing), contexts)


class ItmRows(NamedTuple):
    """ITM's text pass over its 3B rows (:meth:`BlipPretrain.itm_rows`) and each layer's context of them."""

    text: TextPass
    contexts: list[BlockContext]


def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (B, ...) of every rank, concatenated along dim 0 in rank order: (world * B, ...).

    The original ``concat_all_gather``, for the momentum features that enter the queues: no
    gradient, and every rank must hold the same shape. A single process gets ``tensor`` back.
    One collective writes every rank's rows into one tensor (no list of per-rank copies to concatenate).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    tensor = tensor.contiguous()
    gathered = tensor.new_empty((dist.get_world_size() * tensor.shape[0], *tensor.shape[1:]))
    # torch 2.13 renames all_gather_into_tensor (deprecated there) to all_gather_single; earlier ones lack it
    gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
    gather(gathered, tensor)
    return gathered


def gather_momentum_features(image_feat_m: torch.Tensor, text_feat_m: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Both modalities' momentum features (B, D) of every rank, in rank order, through one collective: they travel
    side by side as (B, 2D) rows."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return image_feat_m, text_feat_m
    both = concat_all_gather(torch.cat([image_feat_m, text_feat_m.to(image_feat_m.dtype)], dim=1))
    return both[:, :image_feat_m.shape[1]], both[:, image_feat_m.shape[1]:]
