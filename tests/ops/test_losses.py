"""The pretraining losses against an independent computation from the paper's formulas.

The independent versions below are written from BLIP section 3.2 (and ALBEF for momentum
distillation), in float64 with explicit exp/sum, sharing no code with ``blip_fast.ops``:

* ITC: p_i2t(I)_m = exp(s(I, T_m)/tau) / sum_m' exp(s(I, T_m')/tau) over the batch's momentum
  text features and the queue; targets y = alpha * softmax(s_m/tau) + (1 - alpha) * onehot;
  loss = (H(y_i2t, p_i2t) + H(y_t2i, p_t2i)) / 2 averaged over the batch.
* ITM: cross-entropy over B positives (label 1) and 2B negatives (label 0).
* LM: (1 - eps) * NLL + eps * mean_v(-log p_v), averaged over non-padding targets, eps = 0.1.

Tolerance: 1e-5 relative (the ops compute in fp32).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from blip_fast import ops
from blip_fast.config import tiny_config
from blip_fast.kernels.hard_negatives import sample_hard_negatives_ref
from blip_fast.kernels.lm_loss import lm_loss_ref
from blip_fast.models import BlipPretrain
from blip_fast.ops.losses import itc_loss_ref


def rel_err(a, b):
    a, b = (float(x.detach()) if isinstance(x, torch.Tensor) else float(x) for x in (a, b))
    return abs(a - b) / max(abs(b), 1e-12)


def independent_itc(img, txt, img_m, txt_m, img_queue, txt_queue, temp, alpha, idx=None, idx_queue=None):
    img, txt, img_m, txt_m = (t.double() for t in (img, txt, img_m, txt_m))
    img_all = torch.cat([img_m, img_queue.double().t()])  # (B+Q, D)
    txt_all = torch.cat([txt_m, txt_queue.double().t()])
    batch, total = img.shape[0], img_all.shape[0]

    def softmax_rows(x):
        e = torch.exp(x - x.max(dim=1, keepdim=True).values)
        return e / e.sum(dim=1, keepdim=True)

    if idx is None:
        truth = torch.zeros(batch, total, dtype=torch.float64)
        for i in range(batch):
            truth[i, i] = 1.0
    else:
        ids_all = torch.cat([idx, idx_queue])
        truth = (idx[:, None] == ids_all[None]).double()
        truth = truth / truth.sum(dim=1, keepdim=True)
    loss = 0.0
    for queries, queries_m, keys_all in ((img, img_m, txt_all), (txt, txt_m, img_all)):
        targets = alpha * softmax_rows(queries_m @ keys_all.t() / temp) + (1 - alpha) * truth
        probs = softmax_rows(queries @ keys_all.t() / temp)
        loss = loss + (-(targets * torch.log(probs)).sum(dim=1)).mean() / 2
    return loss


def independent_lm(hidden, weight, bias, targets, eps):
    logits = hidden.double() @ weight.double().t() + bias.double()
    total, count = 0.0, 0
    for row, target in zip(logits, targets.tolist(), strict=True):
        if target == -100:
            continue
        log_z = math.log(torch.exp(row - row.max()).sum().item()) + row.max().item()
        log_probs = row - log_z
        total += (1 - eps) * -log_probs[target].item() + eps * -log_probs.mean().item()
        count += 1
    return total / count


def independent_itm(logits, batch):
    labels = [1] * batch + [0] * (logits.shape[0] - batch)
    total = 0.0
    for row, label in zip(logits.double(), labels, strict=True):
        total += -(row[label] - torch.log(torch.exp(row).sum())).item()
    return total / len(labels)


def unit(*shape, dim=-1):
    return F.normalize(torch.randn(*shape), dim=dim)


@pytest.mark.parametrize("batch,queue,with_idx", [(4, 8, False), (7, 97, False), (8, 64, True), (1, 3, False)])
@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_itc_matches_paper_formula(batch, queue, with_idx, alpha):
    dim = 16
    args = [unit(batch, dim), unit(batch, dim), unit(batch, dim), unit(batch, dim), unit(dim, queue, dim=0),
            unit(dim, queue, dim=0)]
    temp = torch.tensor(0.07)
    idx = torch.randint(0, 3, (batch,)) if with_idx else None
    idx_queue = torch.randint(0, 3, (queue,)) if with_idx else None
    loss, sim_i2t, sim_t2i = itc_loss_ref(*args, temp, alpha, idx, idx_queue)
    expected = independent_itc(*args, 0.07, alpha, idx, idx_queue)
    assert rel_err(loss, expected) < 1e-5
    assert sim_i2t.shape == (batch, batch) and sim_t2i.shape == (batch, batch)
    assert torch.allclose(sim_i2t, args[0] @ args[3].t() / 0.07, atol=1e-5)


def test_itc_gradients_match_paper_formula():
    args = [unit(6, 8).double().requires_grad_(i < 2) for i in range(4)]
    queues = [unit(8, 12, dim=0).double(), unit(8, 12, dim=0).double()]
    loss = itc_loss_ref(*args, *queues, torch.tensor(0.07, dtype=torch.float64), 0.4)[0]
    grads = torch.autograd.grad(loss, args[:2])
    leaves = [a.detach().clone().requires_grad_(True) for a in args[:2]]
    expected = independent_itc(*leaves, args[2].detach(), args[3].detach(), *queues, 0.07, 0.4)
    expected_grads = torch.autograd.grad(expected, leaves)
    for g, e in zip(grads, expected_grads, strict=True):
        assert (g - e).abs().max() < 1e-10


@pytest.mark.parametrize("tokens,pad_fraction", [(1, 0.0), (13, 0.3), (97, 0.45)])
def test_lm_loss_matches_label_smoothing_formula(tokens, pad_fraction):
    hidden, weight, bias = torch.randn(tokens, 24), torch.randn(50, 24) * 0.3, torch.randn(50) * 0.1
    targets = torch.randint(0, 50, (tokens,))
    targets[torch.rand(tokens) < pad_fraction] = -100
    targets[0] = 3  # at least one real target
    loss = lm_loss_ref(hidden, weight, bias, targets, 0.1)
    assert rel_err(loss, independent_lm(hidden, weight, bias, targets, 0.1)) < 1e-5
    per_token = lm_loss_ref(hidden, weight, bias, targets, 0.1, reduction="none")
    assert torch.all(per_token[targets == -100] == 0)
    assert rel_err(per_token.sum() / (targets != -100).sum(), loss) < 1e-6


def test_itm_loss_matches_formula():
    logits = torch.randn(12, 2)
    assert rel_err(ops.itm_loss(logits, 4), independent_itm(logits, 4)) < 1e-6


def test_pretrain_forward_equals_independent_computation():
    """BlipPretrain's three losses, recomputed outside the model from the paper's formulas."""
    config = tiny_config()
    config.text.hidden_dropout = config.text.attention_dropout = 0.0  # deterministic forward
    model = BlipPretrain(config).eval()
    batch = 4  # the original enqueue needs the queue (64) to be a multiple of the batch
    images = torch.randn(batch, 3, 64, 64)
    input_ids = torch.randint(1000, 2000, (batch, 9))
    input_ids[:, 0] = config.text.cls_token_id
    attention_mask = torch.ones_like(input_ids)
    for i, length in enumerate([9, 4, 6, 2]):
        input_ids[i, length - 1] = config.text.sep_token_id
        input_ids[i, length:] = 0
        attention_mask[i, length:] = 0
    image_queue, text_queue = model.image_queue.clone(), model.text_queue.clone()
    online = {k: v.clone() for k, v in model.state_dict().items()}

    with ops.impl_scope("reference"):
        losses = model(images, input_ids, attention_mask, alpha=0.4, generator=torch.Generator().manual_seed(3))

    # momentum parameters after the update the forward made, from the online weights
    for (src, dst) in [("visual_encoder.", "visual_encoder_m."), ("text_encoder.", "text_encoder_m."),
                       ("vision_proj.", "vision_proj_m."), ("text_proj.", "text_proj_m.")]:
        for key, value in online.items():
            if key.startswith(src):
                momentum_key = dst + key[len(src):]
                expected = online[momentum_key] * 0.995 + value * 0.005
                assert torch.allclose(model.state_dict()[momentum_key], expected, atol=1e-7)

    with torch.no_grad():
        image_embeds = model.visual_encoder(images)
        img = F.normalize(model.vision_proj(image_embeds[:, 0]), dim=-1)
        txt = F.normalize(model.text_proj(model.text_encoder(input_ids, attention_mask)[:, 0]), dim=-1)
        img_m = F.normalize(model.vision_proj_m(model.visual_encoder_m(images)[:, 0]), dim=-1)
        txt_m = F.normalize(model.text_proj_m(model.text_encoder_m(input_ids, attention_mask)[:, 0]), dim=-1)
        itc = independent_itc(img, txt, img_m, txt_m, image_queue, text_queue, model.temp.item(), 0.4)
        assert rel_err(losses["itc"], itc) < 1e-5

        # queues: the momentum features were written at the pointer, which advanced by B
        assert torch.allclose(model.image_queue[:, :batch], img_m.t(), atol=1e-6)
        assert torch.allclose(model.text_queue[:, :batch], txt_m.t(), atol=1e-6)
        assert model.queue_ptr.item() == batch

        # ITM with the same draws: uniforms for text->image first, then image->text
        generator = torch.Generator().manual_seed(3)
        sim_i2t = img @ txt_m.t() / model.temp
        sim_t2i = txt @ img_m.t() / model.temp
        neg_img = sample_hard_negatives_ref(sim_t2i, torch.rand(batch, generator=generator))
        neg_txt = sample_hard_negatives_ref(sim_i2t, torch.rand(batch, generator=generator))
        enc = input_ids.clone()
        enc[:, 0] = config.text.enc_token_id
        ones = torch.ones(batch, image_embeds.shape[1], dtype=torch.long)

        def itm(ids, mask, embeds):
            return model.itm_head(model.text_encoder(ids, mask, embeds, ones)[:, 0])

        logits = torch.cat([itm(enc, attention_mask, image_embeds),
                            itm(enc, attention_mask, image_embeds[neg_img]),
                            itm(enc[neg_txt], attention_mask[neg_txt], image_embeds)])
        assert rel_err(losses["itm"], independent_itm(logits, batch)) < 1e-5

        # LM: [DEC] first, targets shifted by one, padding ignored, smoothing 0.1
        dec = input_ids.clone()
        dec[:, 0] = config.text.bos_token_id
        hidden = model.text_decoder.hidden_states(dec, attention_mask, image_embeds, ones)[:, :-1]
        targets = dec[:, 1:].masked_fill(dec[:, 1:] == 0, -100)
        head = model.text_decoder.cls.predictions
        lm = independent_lm(hidden.reshape(-1, hidden.shape[-1]), head.decoder.weight, head.bias,
                            targets.reshape(-1), 0.1)
        assert rel_err(losses["lm"], lm) < 1e-5


def test_fast_and_reference_pretrain_losses_agree():
    config = tiny_config()
    model = BlipPretrain(config).eval()
    twin = BlipPretrain(config).eval()
    twin.load_state_dict(model.state_dict())
    images, ids = torch.randn(4, 3, 64, 64), torch.randint(1000, 2000, (4, 11))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    results = []
    for impl, m in (("reference", model), ("auto", twin)):
        with ops.impl_scope(impl):
            results.append(m(images, ids, mask, alpha=0.4, generator=torch.Generator().manual_seed(0)))
    for key in ("itc", "itm", "lm"):
        assert rel_err(results[1][key], results[0][key]) < 1e-5, key
