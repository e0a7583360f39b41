"""Restructuring must not change what the model computes: BlipPretrain's losses and gradients on fixed seeds, for
the reference and the fast ops, padded and packed captions, separate and joint text passes, equal values recorded
(tiny preset, dropout 0, one CPU thread, fp32; recorded on commit d4b36c2 with torch 2.13.0+cpu).

Tolerance: 2e-5 relative. The paths differ from each other by summation order only (seen: up to 2e-7); a change
of what is computed (a mask, a scale, a missing term) moves these values by far more.
"""

import random

import pytest
import torch

from blip_fast import ops
from blip_fast.config import tiny_config
from blip_fast.data.synthetic import caption, random_scene
from blip_fast.models.blip_pretrain import BlipPretrain
from blip_fast.models.packing import PackedText
from blip_fast.text import BlipTokenizer

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

# losses (itc, itm, lm) and gradient norms (all, vision, text encoder, decoder self-attention) by impl and packing;
# joint and separate passes must both give them
RECORDED = {
    ("reference", False): ((3.0977063, 0.8098916, 10.3320942), (54.0204614, 46.7316346, 24.9958416, 0.0912822808)),
    ("reference", True): ((3.0977063, 0.8098916, 10.3320951), (54.0204614, 46.7316346, 24.9958417, 0.0912822807)),
    ("auto", False): ((3.0977058, 0.8098917, 10.3320942), (54.0204506, 46.7316219, 24.9958428, 0.0912822804)),
    ("auto", True): ((3.0977058, 0.8098917, 10.3320961), (54.0204506, 46.7316219, 24.9958428, 0.0912822800)),
}


def losses_and_gradients(impl: str, packed: bool, joint: bool):
    torch.manual_seed(0)
    config = tiny_config()
    config.text.hidden_dropout = config.text.attention_dropout = 0.0
    model = BlipPretrain(config).train()
    model.joint_grounded_passes = joint
    rng = random.Random(3)
    tokens = BlipTokenizer()([caption(random_scene(rng)) for _ in range(6)], max_length=30)
    images = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    packing = PackedText.from_mask(tokens.attention_mask, 8) if packed else None
    with ops.impl_scope(impl):
        losses = model(images, tokens.input_ids, tokens.attention_mask, alpha=0.4,
                       generator=torch.Generator().manual_seed(5), packing=packing)
        sum(losses.values()).backward()

    def norm(keep):
        grads = [p.grad.double() for name, p in model.named_parameters() if p.grad is not None and keep(name)]
        return torch.sqrt(sum(g.square().sum() for g in grads)).item()

    norms = (norm(lambda name: True), norm(lambda name: name.startswith("visual_encoder.")),
             norm(lambda name: name.startswith("text_encoder.")),
             norm(lambda name: name.startswith("text_decoder.bert.encoder.layer.") and ".attention." in name))
    return tuple(losses[k].item() for k in ("itc", "itm", "lm")), norms


@pytest.mark.parametrize("joint", [False, True], ids=["separate", "joint"])
@pytest.mark.parametrize("impl, packed", list(RECORDED),
                         ids=[f"{impl}-{'packed' if packed else 'padded'}" for impl, packed in RECORDED])
def test_losses_and_gradients_equal_the_recorded_ones(impl, packed, joint):
    losses, norms = losses_and_gradients(impl, packed, joint)
    recorded_losses, recorded_norms = RECORDED[(impl, packed)]
    assert losses == pytest.approx(recorded_losses, rel=2e-5)
    assert norms == pytest.approx(recorded_norms, rel=2e-5)
