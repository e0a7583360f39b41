"""BLIP's three pretraining losses (paper section 3.2).

* ITC -- image-text contrastive loss over the batch plus the momentum feature queue, with
  momentum distillation: targets are ``alpha * softmax(momentum similarities) + (1 - alpha) *
  ground truth`` (``models/blip_pretrain.py``; for retrieval fine-tuning the ground truth marks
  every pair sharing an image id, ``models/blip_retrieval.py``). Backends: ``reference`` below, and
  ``triton`` (CUDA tensors), the streaming kernels of :mod:`blip_fast.kernels.contrastive` behind one
  ``torch.library`` custom op that returns the loss, the in-batch similarities and, when a backward can
  follow, the gradients of the features and the temperature, which its backward scales. They are made in
  the forward because the kernels read the queues, and the model writes this batch into them before the
  backward. Under autocast the entry casts the four feature tensors to the autocast dtype, as the
  reference's matrix products are cast; the queues are read as stored.
* ITM -- binary cross-entropy over 1 positive and 2 hard negatives per pair (plain
  ``F.cross_entropy``; not a hot op).
* LM -- next-token cross-entropy of the decoder with label smoothing 0.1, padding ignored: its own
  module, :mod:`blip_fast.ops.lm_loss`, beside its fused Triton kernel.

The references compute in ``promote_types(dtype, float32)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from blip_fast.kernels import KERNEL_DTYPES
from blip_fast.kernels.contrastive import HAS_TRITON, itc_flops, itc_forward, itc_gradients

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


def _directions(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, idx, idx_queue):
    """The kernels' two directions: (queries, their momentum twins, batch keys, queue, row ids, key ids, queue ids)."""
    return [(image_feat, image_feat_m, text_feat_m, text_queue, idx, idx, idx_queue),
            (text_feat, text_feat_m, image_feat_m, image_queue, idx, idx, idx_queue)]


@torch.library.custom_op("blip_fast::itc_loss_triton", mutates_args=())
def itc_loss_triton_op(
    image_feat: torch.Tensor, text_feat: torch.Tensor, image_feat_m: torch.Tensor, text_feat_m: torch.Tensor,
    image_queue: torch.Tensor, text_queue: torch.Tensor, temp: torch.Tensor, alpha: float,
    idx: torch.Tensor | None, idx_queue: torch.Tensor | None, compute_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, sim_i2t, sim_t2i, grad_image_feat, grad_text_feat, dloss_dtemp)``, the gradients empty without
    ``compute_grads``."""
    directions = _directions(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, idx,
                             idx_queue)
    loss, sims, saved, dloss_dtemp = itc_forward(directions, temp, alpha)
    if not compute_grads:
        return loss, sims[0], sims[1], image_feat.new_empty(0), text_feat.new_empty(0), dloss_dtemp
    grad_image, grad_text = itc_gradients(directions, temp, alpha, saved)
    return loss, sims[0], sims[1], grad_image, grad_text, dloss_dtemp


@itc_loss_triton_op.register_fake
def _itc_loss_fake(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, alpha, idx,
                   idx_queue, compute_grads):
    batch, keys = image_feat.shape[0], text_feat_m.shape[0]
    scalar = image_feat.new_empty((), dtype=torch.float32)
    sim = image_feat.new_empty((batch, keys), dtype=torch.float32)
    if not compute_grads:
        return scalar, sim, sim.clone(), image_feat.new_empty(0), text_feat.new_empty(0), scalar.clone()
    return (scalar, sim, sim.clone(), image_feat.new_empty(image_feat.shape), text_feat.new_empty(text_feat.shape),
            scalar.clone())


def _setup_itc(ctx, inputs, output):
    ctx.computed_grads, ctx.temp_shape = inputs[10], inputs[6].shape
    ctx.save_for_backward(*output[3:])


def _backward_itc(ctx, grad_loss, *_grads_of_other_outputs):
    if not ctx.computed_grads:
        raise RuntimeError("itc_loss_triton was called with compute_grads=False; it has no gradients")
    grad_image, grad_text, dloss_dtemp = ctx.saved_tensors
    grad_temp = (grad_loss * dloss_dtemp).reshape(ctx.temp_shape)
    return grad_image * grad_loss, grad_text * grad_loss, None, None, None, None, grad_temp, None, None, None, None


itc_loss_triton_op.register_autograd(_backward_itc, setup_context=_setup_itc)


def itc_loss_triton(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, alpha,
                    idx=None, idx_queue=None):
    """The Triton backend: same contract as :func:`itc_loss_ref`."""
    device = image_feat.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        image_feat, text_feat, image_feat_m, text_feat_m = (
            t.to(dtype) for t in (image_feat, text_feat, image_feat_m, text_feat_m))
    # the gradients are made in the forward pass (the queues change before the backward), so only when one can follow
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (image_feat, text_feat, temp))
    loss, sim_i2t, sim_t2i, *_ = itc_loss_triton_op(image_feat, text_feat, image_feat_m, text_feat_m, image_queue,
                                                    text_queue, temp, float(alpha), idx, idx_queue, wants_grad)
    return loss, sim_i2t.detach(), sim_t2i.detach()


itc_loss_op = define_op("itc_loss", itc_loss_ref)
# opt-in (train.impl=auto,itc_loss=triton) until a GPU run measures it in the step (benchmarks/gpu_session.sh:
# itc_loss, step_variants); its parity is tested in Triton's interpreter
itc_loss_op.register_triton(itc_loss_triton, HAS_TRITON, dtypes=KERNEL_DTYPES, auto=False)


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
                   grad_argnums=(0, 1, 6))
    )


# torch.utils.flop_counter cannot see the products inside the opaque op: tell it what they cost
@register_flop_formula(torch.ops.blip_fast.itc_loss_triton)
def _itc_flops(image_shape, text_shape, image_m_shape, text_m_shape, image_queue_shape, text_queue_shape, temp_shape,
               alpha, idx_shape, idx_queue_shape, compute_grads, out_shape=None, **kwargs) -> int:
    columns = text_m_shape[0] + image_queue_shape[1]
    return itc_flops(image_shape[0], columns, image_shape[1], compute_grads)
