"""Hard-negative sampling for the ITM loss (BLIP section 3.2, ALBEF's hard negative mining).

For every image one negative text, and for every text one negative image, drawn from the softmax
of the in-batch ITC similarities with the positive excluded. The original
(``models/blip_pretrain.py``) called ``torch.multinomial(...).item()`` once per row, a host
synchronisation each; here the draw is inverse-CDF sampling of given uniforms, on the device.
The algorithm and its reference are in :mod:`blip_fast.kernels.hard_negatives`.

Backends (see :mod:`blip_fast.ops.registry`):

* ``reference`` -- ``sample_hard_negatives_ref``, pure PyTorch, every device.
* ``triton``    -- the Triton kernel, CUDA tensors: the custom op ``blip_fast::sample_hard_negatives_triton``.
* ``cuda``      -- the native extension ``blip_fast._C``: its CPU twin on CPU tensors and, when
  built with CUDA, its CUDA kernel on CUDA tensors: ``blip_fast::sample_hard_negatives_native``.

The fast backends are ``torch.library`` custom ops with a fake (shape) implementation, so that
``torch.compile(fullgraph=True)`` puts them in its graph as opaque nodes instead of breaking it at
the Triton launch or the pybind11 call; dynamo traces the reference like any PyTorch code. A
``torch.Generator`` cannot enter a compiled graph (dynamo has no proxy for it), so compiled code
passes ``uniforms`` or draws them from the global generator (``generator=None``; inductor then
draws with its own RNG unless ``torch._inductor.config.fallback_random`` is set). The ops only
ever see the uniforms: given the same ones, compiled and eager calls pick the same columns.
"""

from __future__ import annotations

import torch

from blip_fast.kernels import KERNEL_DTYPES
from blip_fast.kernels.hard_negatives import (
    HAS_TRITON,
    check_inputs,
    near_cdf_boundary,
    sample_hard_negatives_ref,
    sample_hard_negatives_triton,
)

from ..shapes import PRETRAIN_BATCH
from . import native
from .registry import ParityCase, define_op


@torch.library.custom_op("blip_fast::sample_hard_negatives_triton", mutates_args=())
def sample_hard_negatives_triton_op(sim: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    return sample_hard_negatives_triton(sim, uniforms)


@torch.library.custom_op("blip_fast::sample_hard_negatives_native", mutates_args=())
def sample_hard_negatives_native_op(sim: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    if native._C is None:
        raise RuntimeError(f"sample_hard_negatives_native: blip_fast._C is not available ({native.IMPORT_ERROR})")
    return native._C.sample_hard_negatives(sim, uniforms)


@sample_hard_negatives_triton_op.register_fake
@sample_hard_negatives_native_op.register_fake
def _sample_hard_negatives_fake(sim: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    check_inputs(sim, uniforms)  # the kernels' errors at trace time, from shapes and dtypes alone
    return sim.new_empty(sim.shape[0], dtype=torch.long)


hard_negatives_op = define_op("sample_hard_negatives", sample_hard_negatives_ref)
hard_negatives_op.register_triton(sample_hard_negatives_triton_op, HAS_TRITON, dtypes=KERNEL_DTYPES)
if native.HAS_NATIVE:
    # The CPU twin is always compiled; the CUDA kernel only when the extension was built with CUDA.
    _native_devices = ("cpu", "cuda") if native._C.built_with_cuda() else ("cpu",)
    hard_negatives_op.register("cuda", sample_hard_negatives_native_op, devices=_native_devices, dtypes=KERNEL_DTYPES)


def sample_hard_negatives(
    sim: torch.Tensor,
    uniforms: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One negative column index per row of ``sim`` [B, N] (row i's positive is column i).

    ``sim`` holds ITC logits (fp32/fp16/bf16), N >= B and N >= 2. ``uniforms`` [B] fp32 in [0, 1)
    make the draw deterministic; when omitted they are drawn with ``torch.rand`` on ``sim``'s
    device from ``generator``. Returns a LongTensor [B] that never contains a row's own index.
    Inside ``torch.compile`` pass ``uniforms`` or no ``generator`` (see the module docstring).
    """
    if uniforms is None:
        if not isinstance(sim, torch.Tensor) or sim.dim() != 2:
            raise ValueError("sample_hard_negatives: sim must be a 2-D tensor [B, N]")
        uniforms = torch.rand(sim.shape[0], generator=generator, device=sim.device)
    return hard_negatives_op(sim, uniforms)


def _hard_negatives_case(rows: int, cols: int):
    def make(device, dtype, generator):
        # ITC logits are cosine similarities / temperature (0.07): a spread of several units, and
        # positives (the diagonal) stand out.
        sim = 4.0 * torch.randn(rows, cols, generator=generator)
        sim[:, :rows] += 8.0 * torch.eye(rows)
        sim = sim.to(dtype)
        uniforms = torch.rand(rows, generator=generator)
        # Exact parity needs uniforms clear of cdf boundaries, where implementations that round
        # the cdf differently may pick neighbours. A uniform lands within 1e-5 of one of the N
        # boundaries with probability about 2e-5 * N, so a few redraws of those rows suffice.
        for _ in range(8):
            near = near_cdf_boundary(sim, uniforms)
            if not near.any():
                break
            uniforms[near] = torch.rand(int(near.sum()), generator=generator)
        else:
            raise RuntimeError("could not draw parity uniforms away from cdf boundaries")
        return (sim.to(device), uniforms.to(device)), {}

    return make


_SHAPES = ((2, 2), (7, 7), (PRETRAIN_BATCH, PRETRAIN_BATCH), (97, 97), (7, 40), (PRETRAIN_BATCH, 3 * PRETRAIN_BATCH))
for _rows, _cols in _SHAPES:
    hard_negatives_op.parity_cases.append(
        ParityCase(
            mode="in_batch" if _rows == _cols else "with_extra_columns",
            shape=f"B{_rows} N{_cols}",
            make_inputs=_hard_negatives_case(_rows, _cols),
            exact=True,
        )
    )
