"""Triton kernels of blip_fast, shipped as ``blip_fast.kernels`` (``package_dir`` in setup.py).

One file per kernel, in three layers (the Liger-Kernel layout): the ``@triton.jit`` kernel, a host
launcher that checks inputs, allocates the output and picks the grid, and beside them the
pure-PyTorch reference (``*_ref``) that the rest of the package calls by default and that every
test compares against. The public entries live in :mod:`blip_fast.ops`, which choose between the
reference, these kernels and the native extension (``csrc/``).

Every module here imports without triton installed: each guards its ``import triton`` and exposes
``HAS_TRITON``, so that the package and its CPU tests work on machines without a GPU stack.
"""

import contextlib

import torch

# The dtypes the kernels read (fp32 accumulation inside); fp64, which exactness checks use, takes the references.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision`` for inputs of ``dtype``: fp32 in IEEE precision (TF32 would cost fp32 parity
    its digits); tf32 is ignored for 16-bit inputs."""
    return "ieee" if dtype == torch.float32 else "tf32"


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``, which split heuristics fill; 1 in the interpreter (a few programs)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def device_scope(t: torch.Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current device), or nothing for the interpreter's CPU tensors."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
