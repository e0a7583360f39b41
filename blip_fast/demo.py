"""``blip-fast demo``: a tiny BLIP learns synthetic scenes on the CPU in a few minutes.

This is the stand-in main job until the pretraining engine lands (its own issue): it builds the
``tiny`` pretraining model (:func:`blip_fast.config.tiny_config`) with random weights, trains it
with all three BLIP losses at equal weights (ITC with momentum encoders, the feature queue and
momentum distillation; ITM with hard negatives; LM with label smoothing) on freshly drawn
synthetic scenes, then measures zero-shot image-text retrieval (R@1) on held-out scenes against
chance. It uses the real model and ops; what it lacks is the engine: no checkpoints, no
distributed training. With the defaults (450 steps of 32 scenes) it takes about 4 minutes on 2
free CPU cores (~63 samples/s) and reaches R@1 of about 50% in both directions (chance 1%).

BLIP's pretraining recipe is kept where it can be: AdamW with weight decay 0.05, momentum 0.995,
distillation weight alpha 0.4, temperature 0.07 (learned), label smoothing 0.1, the loss
``itc + itm + lm``. The run is a few hundred steps of a 2.3 M-parameter model, though, so these
settings differ (:data:`DEVIATIONS` is printed at the start of every run):

* **Learning rate** 1e-3 after a 50-step linear warm-up, then constant (BLIP: 3e-4 after 3,000
  warm-up steps, decayed per epoch): the run has only a few hundred steps. (2e-3 with gradient
  clipping at norm 1, the ``clip`` argument, learns about as fast; BLIP does not clip.)
* **Temperature learning rate** 1e-4 (BLIP: the model's): under Adam a scalar moves by about the
  learning rate every step, so at 1e-3 the temperature races down while the features are still
  near-identical (sharper logits then lower the loss faster than alignment does): in ITC-only
  trials it fell from 0.07 to 0.023 in 300 steps (to 0.008 with the default text init, below)
  and R@1 after 300 steps dropped from 35/36% to 32/14%.
* **Text initialisation** N(0, 0.1) (``TextConfig.initializer_range``, encoder and decoder;
  BERT-base: 0.02; BLIP starts its text transformer from pre-trained BERT, never from random
  weights). At width 64, 0.02 makes every caption's ITC feature the same (cosine > 0.9998): the text
  encoder needs ~200 steps just to tell captions apart, and meanwhile the queue rewards pulling
  all image features together. Scaling 0.02 by sqrt(768 / 64) for the smaller fan-in gives 0.07;
  in trials 0.1 aligned soonest (0.05 and 0.2 were slower), ~150 steps sooner than 0.02.
* **Dropout** 0 (BLIP: 0.1): a model this small underfits.
* **Queue** of 96 features (``tiny_config``; BLIP: 57,600) and alpha ramped in over the whole
  run (BLIP: over the first epoch; the demo has no epochs).
* **No augmentation** (BLIP: random resized crops, flips, RandAugment): captions name positions,
  which flips and crops would change.

What did *not* help: a faster momentum encoder (0.95, which this demo used before, or 0.8,
instead of BLIP's 0.995) keeps retrieval at chance: while the text features are still all alike,
the queue's older momentum features differ from the newest ones only by drift, and the ITC loss
then falls by pulling every image feature towards the newest text feature (image features reached
cosine 0.99 within 150 steps). Down-weighting the LM loss early, or scenes of at most 2 objects,
did not make ITC start aligning sooner.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from .config import BlipConfig, tiny_config
from .data.synthetic import caption, draw, random_scene
from .images import eval_transform
from .models import BlipPretrain
from .text import BlipTokenizer

DEVIATIONS = (
    "deviations from BLIP's recipe (a few hundred steps of a tiny model): lr {lr:g} after a {warmup}-step warm-up, "
    "then constant (short run); {clipping}; temperature lr {temp_lr:g} (at the full lr it races down before the "
    "features align); text init std {init:g}, not 0.02 (BLIP starts from pre-trained BERT; 0.02 at width 64 "
    "gives every caption the same features); dropout 0 (tiny model underfits); queue {queue}, alpha ramped over the "
    "whole run (no epochs); no augmentation (captions name positions)"
)


@dataclass
class DemoResult:
    steps: int
    batch: int
    first_losses: dict[str, float]
    last_losses: dict[str, float]
    samples_per_s: float
    train_seconds: float
    recall_i2t: float
    recall_t2i: float
    chance: float


def demo_config(text_init: float = 0.1) -> BlipConfig:
    """``tiny_config`` (architecture unchanged) with the demo's dropout 0 and text init."""
    config = tiny_config()
    config.text.hidden_dropout = config.text.attention_dropout = 0.0
    config.text.initializer_range = text_init
    return config


def synthetic_batch(rng: random.Random, tokenizer: BlipTokenizer, batch: int, image_size: int,
                    max_objects: int = 3):
    """``batch`` freshly drawn scenes: normalised images (B, 3, S, S), token ids and attention mask."""
    scenes = [random_scene(rng, max_objects) for _ in range(batch)]
    images = torch.stack([eval_transform(draw(scene, image_size, rng), image_size) for scene in scenes])
    tokens = tokenizer([caption(scene) for scene in scenes], max_length=30)
    return images, tokens.input_ids, tokens.attention_mask


@torch.no_grad()
def zero_shot_recall(model: BlipPretrain, images, input_ids, attention_mask) -> tuple[float, float]:
    """Recall@1 of image->text and text->image retrieval by ITC similarity."""
    model.eval()
    sim = model.image_features(model.image_embeds(images)) @ model.text_features(input_ids, attention_mask).t()
    target = torch.arange(sim.shape[0])
    return (sim.argmax(dim=1) == target).float().mean().item(), (sim.argmax(dim=0) == target).float().mean().item()


def run_demo(steps: int = 450, batch: int = 32, lr: float = 1e-3, warmup: int = 50, clip: float = 0.0,
             temp_lr: float = 1e-4, momentum: float = 0.995, text_init: float = 0.1, max_objects: int = 3,
             eval_size: int = 100, seed: int = 0, log_every: int = 50, log=print) -> DemoResult:
    """Train the tiny BLIP for ``steps`` steps of ``batch`` scenes, then measure R@1 on ``eval_size``
    held-out scenes. The defaults are the settings explained in the module docstring."""
    torch.manual_seed(seed)
    rng, eval_rng = random.Random(seed), random.Random(seed + 1_000_003)
    config = demo_config(text_init)
    config.momentum = momentum
    model = BlipPretrain(config)
    tokenizer = BlipTokenizer()
    temp = [model.temp]
    rest = [p for p in model.parameters() if p.requires_grad and p is not model.temp]
    optimizer = torch.optim.AdamW([{"params": rest}, {"params": temp, "lr": temp_lr}], lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    generator = torch.Generator().manual_seed(seed)
    size = config.vision.image_size
    log(f"demo: tiny BLIP ({sum(p.numel() for p in rest + temp) / 1e6:.1f} M trained parameters), {steps} steps "
        f"of {batch} synthetic {size}px scenes (up to {max_objects} objects), loss itc + itm + lm, momentum "
        f"{momentum:g}, {torch.get_num_threads()} CPU threads")
    clipping = f"gradient norm clipped at {clip:g} (BLIP: none)" if clip else "no gradient clipping (as BLIP)"
    log(DEVIATIONS.format(lr=lr, warmup=warmup, clipping=clipping, temp_lr=temp_lr, init=text_init,
                          queue=config.queue_size))
    first = last = None
    started = time.perf_counter()
    for step in range(1, steps + 1):
        model.train()
        images, ids, mask = synthetic_batch(rng, tokenizer, batch, size, max_objects)
        alpha = config.alpha * min(1.0, step / steps)  # the original ramps alpha in over the first epoch
        losses = model(images, ids, mask, alpha=alpha, generator=generator)
        loss = losses["itc"] + losses["itm"] + losses["lm"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(rest, clip)
        optimizer.step()
        schedule.step()
        values = {k: v.item() for k, v in losses.items()}
        first = first or values
        last = values
        if step % log_every == 0 or step in (1, steps):
            rate = step * batch / (time.perf_counter() - started)
            log(f"step {step:4d}  itc {values['itc']:.3f}  itm {values['itm']:.3f}  lm {values['lm']:.3f}  "
                f"temp {model.temp.item():.3f}  {rate:.0f} samples/s")
    seconds = time.perf_counter() - started
    images, ids, mask = synthetic_batch(eval_rng, tokenizer, eval_size, size, max_objects)
    i2t, t2i = zero_shot_recall(model, images, ids, mask)
    chance = 1.0 / eval_size
    log(f"trained {steps} steps in {seconds:.0f} s ({steps * batch / seconds:.0f} samples/s); zero-shot retrieval on "
        f"{eval_size} held-out scenes: R@1 image->text {i2t:.1%}, text->image {t2i:.1%} (chance {chance:.1%})")
    return DemoResult(steps, batch, first, last, steps * batch / seconds, seconds, i2t, t2i, chance)
