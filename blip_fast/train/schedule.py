"""The learning-rate and distillation-weight schedules of BLIP's ``pretrain.py`` and fine-tuning scripts.

* Learning rate, ``optim.schedule: step`` (pretraining): at the start of epoch ``e``,
  ``max(min_lr, init_lr * lr_decay_rate ** e)`` (``step_lr_schedule``); during epoch 0 only, step ``i``
  overrides it with the linear warm-up ``min(init_lr, warmup_lr + (init_lr - warmup_lr) * i / warmup_steps)``
  (``warmup_lr_schedule``). A first epoch shorter than the warm-up therefore ends below ``init_lr``, as in the
  original.
* ``optim.schedule: cosine`` (every fine-tuning script: ``cosine_lr_schedule``): at the start of epoch ``e`` of
  ``E``, ``min_lr + (init_lr - min_lr) * (1 + cos(pi * e / E)) / 2``, constant within the epoch; the same warm-up
  in epoch 0 where ``warmup_steps`` asks for one (the original's fine-tuning has none).
* Alpha: ``alpha * min(1, (e * n + i) / (ramp_epochs * n))`` for step ``i`` of ``n`` in epoch
  ``e`` -- ramped in over the first two epochs.

Steps count optimizer steps (``i`` starts at 0); pure functions, so the schedule of a resumed run
is recomputed from its position rather than restored.
"""

from __future__ import annotations

import math

from .config import OptimConfig


def learning_rate(config: OptimConfig, epoch: int, step_in_epoch: int, epochs: int) -> float:
    """The learning rate of step ``step_in_epoch`` of ``epoch`` in a run of ``epochs``."""
    if epoch == 0 and config.warmup_steps > 0:
        ramp = config.warmup_lr + (config.init_lr - config.warmup_lr) * step_in_epoch / config.warmup_steps
        return min(config.init_lr, ramp)
    if config.schedule == "cosine":
        return config.min_lr + (config.init_lr - config.min_lr) * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    return max(config.min_lr, config.init_lr * config.lr_decay_rate ** epoch)


def distillation_alpha(alpha: float, epoch: int, step_in_epoch: int, steps_per_epoch: int,
                       ramp_epochs: float) -> float:
    if ramp_epochs <= 0:
        return alpha
    progress = (epoch * steps_per_epoch + step_in_epoch) / (ramp_epochs * max(1, steps_per_epoch))
    return alpha * min(1.0, progress)
