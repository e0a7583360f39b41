"""Non-finite losses and gradients: noticed without a host sync per step, never written to a checkpoint.

A run whose loss turns NaN or infinite (too high a learning rate, an overflow) is lost from that step on:
every later weight is NaN. Reading each step's loss back to the host to check it would stall the GPU
once a step, so :class:`DivergenceGuard` keeps its account on the device (a few 0-d tensors updated by
each step) and the trainer reads it only where the loop synchronises anyway: at each log step, before
each checkpoint, and at the end of the run. Before each checkpoint the weights themselves are checked too
(:func:`state_is_finite`): a finite loss with a non-finite gradient breaks the weights, not that loss.

``train.nonfinite`` chooses what a non-finite step does:

* ``stop`` (default): the run stops with :class:`TrainingDiverged` at the next check, naming the first
  such step; no checkpoint is written after it, so the last one on disk is the last good state.
* ``skip``: the optimizer leaves every weight, moment and step count as they were when the step's loss or
  gradient is not finite, decided on the device (torch's fused AdamW's ``found_inf``, the mechanism
  ``torch.amp.GradScaler`` uses), as large-scale trainers skip overflowing steps. The forward's own updates
  stay: the momentum encoders' EMA step towards the unchanged weights and the enqueued momentum features.
  Those come from the momentum encoders, which stay finite while the weights do; should they overflow all
  the same, the queue holds a non-finite feature, every later step is skipped, and
  ``train.max_consecutive_skips`` skipped steps in a row stop the run as ``stop`` would: a state that stays
  non-finite cannot be skipped past.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

NONFINITE_MODES = ("stop", "skip")


class TrainingDiverged(RuntimeError):
    """The run stopped on non-finite losses, gradients or weights; the message names the step and what is kept."""


def gradients_not_finite(model: torch.nn.Module, losses: torch.Tensor,
                         norm: torch.Tensor | None = None) -> torch.Tensor:
    """A 0-d float tensor, 1 when the step's ``losses`` or its gradients hold a NaN or an infinity, else 0, on the
    device. ``norm``: the total gradient norm when already computed (clipping returns it). Under DDP every rank
    gets the same answer (a max over ranks), so every rank skips the same steps and the replicas stay equal."""
    if norm is None:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else losses.new_zeros(())
    flag = (~(torch.isfinite(norm) & torch.isfinite(losses).all())).float()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag


def state_is_finite(state: dict) -> bool:
    """Whether every floating tensor of a state dict is finite (one host read: called before a checkpoint write)."""
    checks = [torch.isfinite(t).all() for t in state.values()
              if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
    return bool(torch.stack(checks).all()) if checks else True


class DivergenceGuard:
    """The device-side account of non-finite steps (see the module docstring); one per run."""

    def __init__(self, device: torch.device, mode: str = "stop", max_consecutive_skips: int = 10):
        if mode not in NONFINITE_MODES:
            raise ValueError(f"nonfinite mode must be one of {NONFINITE_MODES}; got {mode!r}")
        self.mode, self.max_consecutive_skips = mode, max_consecutive_skips
        # first non-finite step (-1: none), skipped steps in all, the current and the longest run of skips
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.skipped = torch.zeros((), dtype=torch.long, device=device)
        self.consecutive = torch.zeros((), dtype=torch.long, device=device)
        self.longest = torch.zeros((), dtype=torch.long, device=device)

    def record(self, step: int, losses: torch.Tensor, skipped: torch.Tensor | None) -> torch.Tensor:
        """Account for optimizer step ``step`` (1-based) with its (3,) ``losses`` and, skipping, the optimizer's
        ``found_inf`` flag. Returns 1 where the step counts towards the logged mean losses, else 0 (device)."""
        bad = ~torch.isfinite(losses).all() if skipped is None else skipped > 0
        self.first_bad.copy_(torch.where((self.first_bad < 0) & bad, step, self.first_bad))
        if skipped is None:
            return torch.ones((), device=losses.device)
        self.skipped += bad
        self.consecutive.copy_((self.consecutive + 1) * bad)
        torch.maximum(self.longest, self.consecutive, out=self.longest)
        return (~bad).float()

    def state(self) -> tuple[int, int, int]:
        """(first non-finite step or -1, skipped steps, longest run of skips): the one host read."""
        first, skipped, longest = torch.stack([self.first_bad, self.skipped, self.longest]).tolist()
        return first, skipped, longest

    def check(self, first: int, skipped: int, longest: int, last_checkpoint: str | None) -> int:
        """Raise :class:`TrainingDiverged` when the account :meth:`state` read (on every rank: the earliest first
        step and the most skips) says the run must stop; else return the steps skipped so far."""
        if self.mode == "stop" and first >= 0:
            raise TrainingDiverged(
                f"training diverged: the loss of step {first} is not finite (NaN or inf). {kept(last_checkpoint)} "
                "Lower optim.init_lr, set optim.clip_grad_norm, or let train.nonfinite=skip skip such steps.")
        if self.mode == "skip" and longest >= self.max_consecutive_skips:
            raise TrainingDiverged(
                f"training diverged: {longest} steps in a row had a non-finite loss or gradient and were skipped "
                f"(train.max_consecutive_skips={self.max_consecutive_skips}; the first at step {first}). "
                f"{kept(last_checkpoint)} Lower optim.init_lr or set optim.clip_grad_norm.")
        return skipped


def kept(last_checkpoint: str | None) -> str:
    """What a stopped run leaves behind, for its message."""
    if last_checkpoint is None:
        return "No checkpoint of this run was written."
    return f"No checkpoint was written after it: the last good one is {last_checkpoint}."
