"""Test helpers for the op registry (blip_fast.ops.registry)."""

import dataclasses

import torch

from blip_fast.parity import check_case


def let_backend_run_on(monkeypatch, op, devices, backend: str = "triton") -> None:
    """For one test, let ``op``'s ``backend`` be selected for tensors on ``devices`` (the Triton kernels take CPU
    tensors in Triton's interpreter), available whatever this machine has."""
    runs_here = dataclasses.replace(op.impls[backend], devices=tuple(devices), is_available=lambda: True)
    monkeypatch.setitem(op.impls, backend, runs_here)


def parity_failures_on_gpu(op_name: str, backend: str, case, dtype: torch.dtype) -> list:
    """The rows of ``blip-fast parity``'s check of ``backend`` on one parity case and dtype, on CUDA, that fail."""
    return [row for row in check_case(op_name, backend, case, dtype, torch.device("cuda")) if not row.passed]


def cuda_peak_bytes(call) -> int:
    """Memory ``call()`` allocates on the GPU at its peak beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base
