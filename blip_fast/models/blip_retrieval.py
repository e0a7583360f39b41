"""BLIP retrieval model (``models/blip_retrieval.py``): ITC features and ITM scores, and its fine-tuning losses.

Retrieval ranks with ITC similarities, then re-ranks the top k with the ITM head (paper section
5.1). Fine-tuning (:meth:`BlipRetrieval.forward`, the original's ``forward(image, caption, alpha, idx)``) is
pretraining's ITC and ITM with what COCO and Flickr30k need, five captions per image:

* ITC's ground truth marks every pair sharing an image id as positive, in the batch and in the queue, whose
  momentum features carry their image ids (``idx_queue``);
* ITM's hard negatives are drawn from the ITC similarities with every pair of the same image masked out, from this
  rank's batch or, with ``negative_all_rank`` (the original's COCO setting), from every rank's, the gradient
  flowing back to the rank that computed the negative image's tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import ops
from ..config import BlipConfig
from .blip_matching import ImageTextMatchingModel, first_states
from .blip_pretrain import concat_all_gather, gather_momentum_features
from .fast_passes import BlockContext


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

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_ids: torch.Tensor, alpha: float, generator: torch.Generator | None = None
                ) -> dict[str, torch.Tensor]:
        """``{"itc": ..., "itm": ...}`` of a batch of images, their captions ([CLS] first) and the image ids
        (B,) that say which captions describe the same image."""
        if not input_ids.shape[0] == images.shape[0] == image_ids.shape[0]:
            raise ValueError(f"{images.shape[0]} images, {input_ids.shape[0]} captions and {image_ids.shape[0]} "
                             "image ids: one of each per pair")
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        image_embeds = self.image_embeds(images)
        image_feat = self.image_features(image_embeds)
        text_feat = self.text_features(input_ids, attention_mask)
        with torch.no_grad():
            self.momentum_update()
            image_feat_m = F.normalize(self.vision_proj_m(self.visual_encoder_m(images)[:, 0]), dim=-1)
            text_feat_m = F.normalize(self.text_proj_m(first_states(self.text_encoder_m, input_ids, attention_mask)),
                                      dim=-1)
        loss_itc, _, _ = ops.itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, self.image_queue,
                                      self.text_queue, self.temp, alpha, image_ids, self.idx_queue.view(-1))
        all_image_ids = concat_all_gather(image_ids)
        self.enqueue(image_feat_m, text_feat_m, all_image_ids)
        return {"itc": loss_itc, "itm": self.itm_loss(image_embeds, image_feat, text_feat, input_ids, attention_mask,
                                                      image_ids, all_image_ids, generator)}

    @torch.no_grad()
    def enqueue(self, image_feat_m: torch.Tensor, text_feat_m: torch.Tensor, image_ids: torch.Tensor) -> None:
        """The momentum features (of every rank) and their image ids into the queues, which share one pointer."""
        image_feat_m, text_feat_m = gather_momentum_features(image_feat_m, text_feat_m)
        for queue, rows in ((self.image_queue, image_feat_m), (self.text_queue, text_feat_m)):
            ops.enqueue_(queue, self.ptr_queue.clone(), rows)
        ops.enqueue_(self.idx_queue, self.ptr_queue, image_ids.view(-1, 1))

    def itm_loss(self, image_embeds, image_feat, text_feat, input_ids, attention_mask, image_ids, all_image_ids,
                 generator) -> torch.Tensor:
        """ITM over B positives, B (hard-negative text, image) and B (text, hard-negative image) rows."""
        batch = image_embeds.shape[0]
        enc_ids = self.with_enc(input_ids)
        world = self.config.negative_all_rank and dist.is_available() and dist.is_initialized()
        with torch.no_grad():
            # candidates: this rank's pairs or every rank's; pairs of one image are never each other's negatives
            same_image = image_ids.view(-1, 1) == (all_image_ids if world else image_ids).view(1, -1)
            image_feat_all = concat_all_gather(image_feat) if world else image_feat
            text_feat_all = concat_all_gather(text_feat) if world else text_feat
            offset = dist.get_rank() * batch if world else 0  # where this rank's pairs are among the candidates
            negative_image = sample_negatives(text_feat @ image_feat_all.t() / self.temp, same_image, offset,
                                              generator)
            negative_text = sample_negatives(image_feat @ text_feat_all.t() / self.temp, same_image, offset,
                                             generator)
        if world:  # the negatives' tokens with their gradient, and every rank's captions (padded alike)
            image_embeds_all = torch.cat(dist.nn.functional.all_gather(image_embeds))
            enc_ids_all, mask_all = concat_all_gather(enc_ids), concat_all_gather(attention_mask)
        else:
            image_embeds_all, enc_ids_all, mask_all = image_embeds, enc_ids, attention_mask
        # rows: B positives, B (negative text, image i), B (text i, negative image). The first 2B attend to each
        # image's own keys/values stacked two to an image (BlockContext), the last B to the negative images': B + B
        # rows of keys/values projected instead of 3B
        ids = torch.cat([enc_ids, enc_ids_all[negative_text], enc_ids])
        mask = torch.cat([attention_mask, mask_all[negative_text], attention_mask])
        image_kv = self.image_keys_values(image_embeds)
        if world:  # the negatives may be another rank's images: their tokens were gathered, project them
            negative_kv = self.image_keys_values(image_embeds_all[negative_image])
            contexts = [BlockContext(((k, v, 2, None), (nk, nv, 1, None)))
                        for (k, v), (nk, nv) in zip(image_kv, negative_kv, strict=True)]
        else:
            contexts = [BlockContext(((k, v, 2, None), (k, v, 1, negative_image))) for k, v in image_kv]
        return ops.itm_loss(self.itm_logits_from_keys_values(contexts, ids, mask), batch)


def sample_negatives(sim: torch.Tensor, excluded: torch.Tensor, offset: int,
                     generator: torch.Generator | None) -> torch.Tensor:
    """One column per row of ITC logits ``sim`` (B, N), drawn with probability ``softmax(sim)`` among the columns
    ``excluded`` (B, N) does not mark, as the original's ``torch.multinomial`` of the masked softmax; row i's own
    pair is column ``offset + i``. A row whose every column is excluded (a batch of one image's captions) has no
    true negative: it draws from every column but its own instead of failing as the original's multinomial of
    zeros does."""
    probabilities = F.softmax(sim.float(), dim=1)
    weights = probabilities.masked_fill(excluded, 0.0)
    empty = weights.sum(dim=1, keepdim=True) == 0
    rows = torch.arange(sim.shape[0], device=sim.device)
    own = torch.zeros_like(excluded)
    own[rows, offset + rows] = True
    weights = torch.where(empty, probabilities.masked_fill(own, 0.0), weights)
    return torch.multinomial(weights, 1, generator=generator).view(-1)
