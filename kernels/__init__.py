"""Triton kernels of blip_fast, shipped as ``blip_fast.kernels`` (``package_dir`` in setup.py).

One file per kernel, in three layers (the Liger-Kernel layout): the ``@triton.jit`` kernel, a host
launcher that checks inputs, allocates the output and picks the grid, and beside them the
pure-PyTorch reference (``*_ref``) that the rest of the package calls by default and that every
test compares against. The public entries live in :mod:`blip_fast.ops`, which choose between the
reference, these kernels and the native extension (``csrc/``).

Every module here imports without triton installed: each guards its ``import triton`` and exposes
``HAS_TRITON``, so that the package and its CPU tests work on machines without a GPU stack.
"""

import torch

# The dtypes the kernels read (fp32 accumulation inside); fp64, which exactness checks use, takes the references.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
