"""Test helpers for the op registry (blip_fast.ops.registry)."""

import dataclasses

import torch


def let_backend_run_on(monkeypatch, op, devices, backend: str = "triton") -> None:
    """For one test, let ``op``'s ``backend`` be selected for tensors on ``devices`` (the Triton kernels take CPU
    tensors in Triton's interpreter), available whatever this machine has."""
    runs_here = dataclasses.replace(op.impls[backend], devices=tuple(devices), is_available=lambda: True)
    monkeypatch.setitem(op.impls, backend, runs_here)


def cuda_peak_bytes(call) -> int:
    """Memory ``call()`` allocates on the GPU at its peak beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base
