"""AdamW for pretraining: the original's parameter groups, and the fastest available implementation.

Groups: every trainable parameter decays by ``weight_decay`` (the original passes
``model.parameters()`` to AdamW); ``decay_norms_and_biases: false`` exempts biases, LayerNorm
weights and the temperature (LAVIS, timm). With ``temp_lr`` the temperature gets its own group
and learning rate. Each group carries ``lr_scale`` so the schedule sets ``lr = scheduled * scale``.

Implementations (``optim.fused``): torch's fused AdamW (one kernel per step for all tensors, on
CUDA and CPU), apex's ``FusedAdam(adam_w_mode=True)`` when installed, ``foreach`` (multi-tensor,
unfused) and ``loop`` (one tensor at a time: the original's ``torch.optim.AdamW`` default before
torch 2.0, kept as the reference).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from .config import OptimConfig

log = logging.getLogger("blip_fast.train")


def parameter_groups(model: nn.Module, config: OptimConfig) -> list[dict]:
    temp = getattr(model, "temp", None)
    decay, no_decay, temperature = [], [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if param is temp and config.temp_lr is not None:
            temperature.append(param)
        elif config.decay_norms_and_biases or (param.ndim >= 2 and param is not temp):
            decay.append(param)
        else:
            no_decay.append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay, "lr_scale": 1.0, "name": "decay"}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0, "name": "no_decay"})
    if temperature:
        # a fixed learning rate: the scale is relative to init_lr and follows the schedule's shape
        groups.append({"params": temperature, "weight_decay": 0.0 if not config.decay_norms_and_biases
                       else config.weight_decay, "lr_scale": config.temp_lr / config.init_lr, "name": "temperature"})
    return groups


def _apex_fused_adam():
    try:
        from apex.optimizers import FusedAdam
    except ImportError:
        return None
    return FusedAdam


def build_optimizer(model: nn.Module, config: OptimConfig, device: torch.device,
                    capturable: bool = False, skip_nonfinite: bool = False) -> torch.optim.Optimizer:
    """AdamW over :func:`parameter_groups`. ``capturable``: torch's fused AdamW with its learning rates as device
    tensors, which a CUDA graph can replay (blip_fast.train.cuda_graph). ``skip_nonfinite``: torch's fused AdamW
    with a ``found_inf`` flag on the device; a step with the flag set changes nothing (blip_fast.train.divergence)."""
    groups = parameter_groups(model, config)
    kwargs = {"lr": config.init_lr, "betas": tuple(config.betas), "eps": config.eps}
    choice = config.fused
    if skip_nonfinite and choice not in ("auto", "torch"):
        raise ValueError(f"skipping non-finite steps needs torch's fused AdamW; optim.fused={choice} is not")
    if capturable:
        if choice not in ("auto", "torch"):
            raise ValueError(f"a capturable optimizer is torch's fused AdamW; optim.fused={choice} is not")
        for group in groups:
            group["lr"] = torch.tensor(config.init_lr * group["lr_scale"], device=device)
        log.info("optimizer: torch fused AdamW on %s, capturable", device.type)
        return _with_found_inf(torch.optim.AdamW(groups, fused=True, capturable=True, **kwargs), device,
                               skip_nonfinite)
    if skip_nonfinite:
        log.info("optimizer: torch fused AdamW on %s, skipping non-finite steps", device.type)
        return _with_found_inf(torch.optim.AdamW(groups, fused=True, **kwargs), device, True)
    if choice in ("auto", "apex") and device.type == "cuda" and _apex_fused_adam() is not None:
        log.info("optimizer: apex FusedAdam (AdamW mode)")
        return _apex_fused_adam()(groups, adam_w_mode=True, **kwargs)
    if choice == "apex":
        raise ValueError("optim.fused=apex: apex is not installed (or no CUDA device); use torch or auto")
    if choice in ("auto", "torch"):
        log.info("optimizer: torch fused AdamW on %s", device.type)
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    log.info("optimizer: torch AdamW (%s)", choice)
    return torch.optim.AdamW(groups, foreach=choice == "foreach", **kwargs)


def _with_found_inf(optimizer: torch.optim.AdamW, device: torch.device, skip: bool) -> torch.optim.AdamW:
    # torch's fused AdamW reads the attribute on every step, as torch.amp.GradScaler sets it: where it is non-zero
    # the kernel leaves weights and moments alone and the step counts are set back
    if skip:
        optimizer.found_inf = torch.zeros((), device=device)
    return optimizer


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict,
                         load: Callable[[dict], None] | None = None) -> None:
    """Load a checkpoint's AdamW moments and step counts into ``optimizer``, keeping this run's settings.

    ``Optimizer.load_state_dict`` would also bring back the saved groups' settings: the checkpoint's weight
    decay, betas, eps and learning-rate scales over the run's config (which config.json then misreports), and
    its ``capturable`` / ``fused`` flags and plain-number learning rates over a CUDA graph's device tensors (whose
    capture then fails). Step counts move to where this optimizer keeps them: torch's AdamW per parameter, apex's
    FusedAdam per group. Raises CheckpointError when the groups do not match (another
    ``optim.decay_norms_and_biases`` or ``optim.temp_lr``). ``load``: what loads the state (default
    ``optimizer.load_state_dict``; FSDP2 loads full states into its shards, blip_fast.train.fsdp)."""
    from ..checkpoint.io import CheckpointError

    saved_groups, saved_state = state["param_groups"], state["state"]
    if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in optimizer.param_groups]:
        raise CheckpointError(
            f"the checkpoint's optimizer has parameter groups of {[len(g['params']) for g in saved_groups]} tensors, "
            f"this run's {[len(g['params']) for g in optimizer.param_groups]}: resume with the checkpoint's "
            "optim.decay_norms_and_biases and optim.temp_lr")
    steps_in_groups = not isinstance(optimizer, torch.optim.AdamW)  # apex's FusedAdam
    state = {"param_groups": [dict(g) for g in saved_groups], "state": {k: dict(v) for k, v in saved_state.items()}}
    for group in state["param_groups"]:
        per_param = [state["state"][i] for i in group["params"] if i in state["state"]]
        if steps_in_groups and "step" not in group and per_param and "step" in per_param[0]:
            group["step"] = int(per_param[0]["step"])
        elif not steps_in_groups and "step" in group:
            step = group.pop("step")
            for entry in per_param:
                entry.setdefault("step", torch.tensor(float(step)))
    settings = [{k: v for k, v in g.items() if k not in ("params", "step")} for g in optimizer.param_groups]
    (load or optimizer.load_state_dict)(state)
    for group, mine in zip(optimizer.param_groups, settings, strict=True):
        group.update(mine)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Each group's rate: ``lr`` times its ``lr_scale``. A capturable optimizer's rates are device tensors
    written in place (a captured graph reads them there); one loaded from a checkpoint as a number or on
    another device becomes such a tensor here, before any capture."""
    for group in optimizer.param_groups:
        value = lr * group.get("lr_scale", 1.0)
        current = group["lr"]
        if not group.get("capturable", False):
            group["lr"] = float(value)
            continue
        device = group["params"][0].device
        if isinstance(current, torch.Tensor) and current.device == device:
            current.fill_(value)
        else:
            group["lr"] = torch.tensor(value, device=device)
