"""``blip-fast demo``: a tiny BLIP learns synthetic scenes on the CPU in about a minute.

This is the stand-in main job until the pretraining engine lands (its own issue): it builds the
``tiny`` pretraining model with random weights, trains it with all three BLIP losses (ITC with
momentum distillation and the queue, ITM with hard negatives, LM) on freshly drawn synthetic
scenes, then measures zero-shot image-text retrieval on held-out scenes against chance. It uses
the real model and ops; what it lacks is the engine: no learning-rate schedule, no checkpoints,
no distributed training.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from .config import tiny_config
from .data.synthetic import sample
from .images import eval_transform
from .models import BlipPretrain
from .text import BlipTokenizer


@dataclass
class DemoResult:
    steps: int
    first_losses: dict[str, float]
    last_losses: dict[str, float]
    samples_per_s: float
    recall_i2t: float
    recall_t2i: float
    chance: float


def synthetic_batch(rng: random.Random, tokenizer: BlipTokenizer, batch: int, image_size: int):
    pairs = [sample(rng, image_size) for _ in range(batch)]
    images = torch.stack([eval_transform(image, image_size) for image, _ in pairs])
    tokens = tokenizer([text for _, text in pairs], max_length=30)
    return images, tokens.input_ids, tokens.attention_mask


@torch.no_grad()
def zero_shot_recall(model: BlipPretrain, images, input_ids, attention_mask) -> tuple[float, float]:
    """Recall@1 of image->text and text->image retrieval by ITC similarity."""
    model.eval()
    sim = model.image_features(model.image_embeds(images)) @ model.text_features(input_ids, attention_mask).t()
    target = torch.arange(sim.shape[0])
    return (sim.argmax(dim=1) == target).float().mean().item(), (sim.argmax(dim=0) == target).float().mean().item()


def run_demo(steps: int = 600, batch: int = 24, lr: float = 1e-3, warmup: int = 100, momentum: float = 0.95,
             eval_size: int = 100, seed: int = 0, log=print) -> DemoResult:
    """Train and evaluate. Three settings differ from BLIP's base recipe, because the run is a few
    hundred steps of a 4.5 M-parameter model: ``momentum`` 0.95 instead of 0.995 (the momentum
    encoders provide the ITC keys; at 0.995 they would stay near their random start), a short
    linear warm-up to a higher learning rate, and no dropout (a model this small underfits)."""
    torch.manual_seed(seed)
    rng, eval_rng = random.Random(seed), random.Random(seed + 1_000_003)
    config = tiny_config()
    config.momentum = momentum
    config.text.hidden_dropout = config.text.attention_dropout = 0.0
    model = BlipPretrain(config)
    tokenizer = BlipTokenizer()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    generator = torch.Generator().manual_seed(seed)
    size = config.vision.image_size
    log(f"demo: tiny BLIP ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters), "
        f"{steps} steps of {batch} synthetic {size}px scenes on the CPU")
    first = last = None
    started = time.perf_counter()
    for step in range(1, steps + 1):
        model.train()
        images, ids, mask = synthetic_batch(rng, tokenizer, batch, size)
        alpha = config.alpha * min(1.0, step / steps)  # the original ramps alpha in over the first epoch
        losses = model(images, ids, mask, alpha=alpha, generator=generator)
        loss = losses["itc"] + losses["itm"] + losses["lm"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        values = {k: v.item() for k, v in losses.items()}
        first = first or values
        last = values
        if step % 50 == 0 or step == 1:
            rate = step * batch / (time.perf_counter() - started)
            log(f"step {step:4d}  itc {values['itc']:.3f}  itm {values['itm']:.3f}  lm {values['lm']:.3f}  "
                f"{rate:.0f} samples/s")
    rate = steps * batch / (time.perf_counter() - started)
    images, ids, mask = synthetic_batch(eval_rng, tokenizer, eval_size, size)
    i2t, t2i = zero_shot_recall(model, images, ids, mask)
    chance = 1.0 / eval_size
    log(f"zero-shot retrieval on {eval_size} held-out scenes: R@1 image->text {i2t:.1%}, "
        f"text->image {t2i:.1%} (chance {chance:.1%})")
    return DemoResult(steps, first, last, rate, i2t, t2i, chance)
