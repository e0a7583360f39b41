"""Test helpers for the op registry (blip_fast.ops.registry)."""

import dataclasses


def let_backend_run_on(monkeypatch, op, devices, backend: str = "triton") -> None:
    """For one test, let ``op``'s ``backend`` be selected for tensors on ``devices`` (the Triton kernels take CPU
    tensors in Triton's interpreter), available whatever this machine has."""
    runs_here = dataclasses.replace(op.impls[backend], devices=tuple(devices), is_available=lambda: True)
    monkeypatch.setitem(op.impls, backend, runs_here)
