"""On a GPU: the base-size pretraining step through the fast backends equals the reference.

Tolerances: fp32 (TF32 off) relative 1e-4 on each loss; bf16 autocast relative 2e-2 (the
reference runs the same autocast, so both see bf16 matmuls; the bound covers the different
summation orders of fused and eager attention).
"""

import pytest
import torch

from blip_fast import ops
from blip_fast.config import base_config
from blip_fast.models import BlipPretrain
from blip_fast.shapes import PRETRAIN_IMAGE_SIZE, PRETRAIN_TEXT_LENGTH

pytestmark = pytest.mark.gpu


def _batch(batch: int, length: int, device):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, PRETRAIN_IMAGE_SIZE, PRETRAIN_IMAGE_SIZE, generator=generator).to(device)
    ids = torch.randint(1000, 30000, (batch, length), generator=generator)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    lengths = torch.randint(5, length + 1, (batch,), generator=generator)
    for i, n in enumerate(lengths.tolist()):
        ids[i, n - 1] = 102
        ids[i, n:] = 0
        mask[i, n:] = 0
    return images, ids.to(device), mask.to(device)


@pytest.mark.parametrize("autocast,tol", [(False, 1e-4), (True, 2e-2)])
def test_base_pretrain_step_fast_equals_reference(autocast, tol):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    config = base_config()
    config.queue_size = 960
    config.text.hidden_dropout = config.text.attention_dropout = 0.0
    model = BlipPretrain(config).cuda().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    images, ids, mask = _batch(12, PRETRAIN_TEXT_LENGTH, "cuda")
    losses = {}
    for impl in ("reference", "auto"):
        model.load_state_dict(state)
        with ops.impl_scope(impl), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = model(images, ids, mask, alpha=0.4, generator=torch.Generator(device="cuda").manual_seed(0))
        losses[impl] = {k: v.float().item() for k, v in out.items()}
    for key in ("itc", "itm", "lm"):
        ref, fast = losses["reference"][key], losses["auto"][key]
        assert abs(fast - ref) <= tol * abs(ref), (key, fast, ref)
