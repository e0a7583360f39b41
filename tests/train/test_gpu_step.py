"""On a GPU, a training step never waits for the device: no host synchronisation inside the step."""

import pytest
import torch
from train_helpers import synthetic_step_batch

from blip_fast import ops
from blip_fast.config import tiny_config
from blip_fast.models.blip_pretrain import BlipPretrain
from blip_fast.train.config import OptimConfig
from blip_fast.train.optim import build_optimizer
from blip_fast.train.step import optimizer_step


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("packed, impl", [(False, "auto"), (True, "auto"),
                                          (True, "auto,varlen_attention=triton,varlen_cross_attention=triton")],
                         ids=["padded", "packed", "packed_attention_kernel"])
def test_training_step_never_synchronises(precision, packed, impl):
    with ops.impl_scope(impl):
        step_without_synchronising(precision, packed)


def step_without_synchronising(precision, packed):
    device = torch.device("cuda")
    model = BlipPretrain(tiny_config()).to(device).train()
    optimizer = build_optimizer(model, OptimConfig(fused="torch", clip_grad_norm=1.0), device)
    batch = synthetic_step_batch(16, 0, device, pack_multiple=8 if packed else None)
    generator = torch.Generator(device=device).manual_seed(0)
    # the first step may synchronise (lazy optimizer state, library handles); later steps must not
    optimizer_step(model, optimizer, [batch], 0.4, generator, precision, clip_grad_norm=1.0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            losses = optimizer_step(model, optimizer, [batch], 0.4, generator, precision, clip_grad_norm=1.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(losses).all()
