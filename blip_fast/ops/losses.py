"""BLIP's three pretraining losses (paper section 3.2).

* ITC -- image-text contrastive loss over the batch plus the momentum feature queue, with
  momentum distillation: targets are ``alpha * softmax(momentum similarities) + (1 - alpha) *
  ground truth`` (``models/blip_pretrain.py``; for retrieval fine-tuning the ground truth marks
  every pair sharing an image id, ``models/blip_retrieval.py``).
* ITM -- binary cross-entropy over 1 positive and 2 hard negatives per pair (plain
  ``F.cross_entropy``; not a hot op).
* LM -- next-token cross-entropy of the decoder with label smoothing 0.1, padding ignored: its own
  module, :mod:`blip_fast.ops.lm_loss`, beside its fused Triton kernel.

The references compute in ``promote_types(dtype, float32)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..shapes import EMBED_DIM, PRETRAIN_BATCH, QUEUE_SIZE
from .registry import ParityCase, define_op


def _itc_targets(batch: int, queue: int, device, idx: torch.Tensor | None, idx_queue: torch.Tensor | None):
    """Ground-truth target distribution over (batch + queue) columns, rows summing to 1."""
    if idx is None:
        targets = torch.zeros(batch, batch + queue, device=device)
        targets.fill_diagonal_(1.0)
        return targets
    idx = idx.view(-1, 1)
    idx_all = torch.cat([idx.t(), idx_queue.view(1, -1)], dim=1)
    positives = torch.eq(idx, idx_all).float()
    return positives / positives.sum(dim=1, keepdim=True)


def itc_loss_ref(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_feat_m: torch.Tensor,
    text_feat_m: torch.Tensor,
    image_queue: torch.Tensor,
    text_queue: torch.Tensor,
    temp: torch.Tensor,
    alpha: float,
    idx: torch.Tensor | None = None,
    idx_queue: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ITC loss with momentum distillation.

    Args: L2-normalised features ``image_feat, text_feat`` (B, D) of the online encoders and
    ``image_feat_m, text_feat_m`` (B, D) of the momentum encoders; queues (D, Q) of past momentum
    features; ``temp`` a scalar tensor (already clamped); ``alpha`` the distillation weight;
    optional image ids ``idx`` (B,) and ``idx_queue`` (Q,) for retrieval fine-tuning.

    Returns ``(loss, sim_i2t, sim_t2i)`` where the two similarity matrices are the in-batch
    (B, B) blocks ``feat @ feat_all / temp``, detached, from which hard negatives are sampled.
    """
    compute = torch.promote_types(image_feat.dtype, torch.float32)
    image_feat, text_feat = image_feat.to(compute), text_feat.to(compute)
    temp = temp.to(compute)
    batch, queue = image_feat.shape[0], image_queue.shape[1]
    with torch.no_grad():
        image_feat_all = torch.cat([image_feat_m.to(compute).t(), image_queue.to(compute)], dim=1)  # (D, B+Q)
        text_feat_all = torch.cat([text_feat_m.to(compute).t(), text_queue.to(compute)], dim=1)  # (D, B+Q)
        sim_i2t_m = image_feat_m.to(compute) @ text_feat_all / temp
        sim_t2i_m = text_feat_m.to(compute) @ image_feat_all / temp
        targets = _itc_targets(batch, queue, image_feat.device, idx, idx_queue).to(compute)
        sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * targets
        sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * targets
    sim_i2t = image_feat @ text_feat_all / temp  # (B, B+Q)
    sim_t2i = text_feat @ image_feat_all / temp
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
    loss = (loss_i2t + loss_t2i) / 2
    return loss, sim_i2t[:, :batch].detach(), sim_t2i[:, :batch].detach()


itc_loss_op = define_op("itc_loss", itc_loss_ref)


def itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, alpha,
             idx=None, idx_queue=None):
    """ITC loss through the selected backend; see :func:`itc_loss_ref`."""
    return itc_loss_op(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp,
                       alpha, idx, idx_queue)


def itm_loss(itm_logits: torch.Tensor, batch: int) -> torch.Tensor:
    """ITM cross-entropy: the first ``batch`` rows are positives, the next ``2 * batch`` negatives."""
    # made on the device: a host-to-device copy would stall the step and cannot be captured in a CUDA graph
    labels = torch.zeros(itm_logits.shape[0], dtype=torch.long, device=itm_logits.device)
    labels[:batch] = 1
    return F.cross_entropy(itm_logits.float(), labels)


def _itc_case(batch: int, queue: int, dim: int, with_idx: bool):
    def make(device, dtype, generator):
        def feat(*shape, along=-1):
            return F.normalize(torch.randn(*shape, generator=generator), dim=along)

        args = (
            feat(batch, dim).to(device, dtype),
            feat(batch, dim).to(device, dtype),
            feat(batch, dim).to(device, dtype),
            feat(batch, dim).to(device, dtype),
            feat(dim, queue, along=0).to(device, dtype),
            feat(dim, queue, along=0).to(device, dtype),
            torch.tensor(0.07, device=device),
            0.4,
        )
        idx = idx_queue = None
        if with_idx:
            idx = torch.randint(0, batch // 2 + 1, (batch,), generator=generator).to(device)
            idx_queue = torch.randint(0, batch, (queue,), generator=generator).to(device)
        return args + (idx, idx_queue), {}

    return make


for _mode, _b, _q, _idx in [("pretrain", PRETRAIN_BATCH, QUEUE_SIZE, False), ("retrieval_idx", 32, 4096, True),
                            ("odd", 7, 97, False)]:
    itc_loss_op.parity_cases.append(
        ParityCase(mode=_mode, shape=f"B{_b} Q{_q} D{EMBED_DIM}", make_inputs=_itc_case(_b, _q, EMBED_DIM, _idx),
                   grad_argnums=(0, 1))
    )
