"""Benchmark of the decoding step's attention (generation), forward only, bf16.

Implementations, on the parity cases of ``decode_attention`` (blip_fast/ops/decode_attention.py: captioning's beam
search on 32 images and on one, 384 px; the one-token self-attention steps, dynamic and static; VQA's answers
against the question):

* ``sdpa``      -- ``ops.attention``'s path (torch's SDPA), what every decoding step runs by default;
* ``reference`` -- eager softmax attention;
* ``fast``      -- the split-key Triton kernels (``blip_fast.kernels.decode_attention``) at their default tiling,
  and ``fast[bnN,pP]`` at other key tiles and programs per SM, to choose the default from.

The kernel is registered ``auto=False``: ``auto`` adopts it once this benchmark and ``bench_generate.py --impl
fast_decode_kernel`` show it faster on a GPU.

    python benchmarks/bench_decode_attention.py [--json PATH]

with PATH like ``benchmarks/results/kernels-h100-YYYYMMDD-decode-attention.json``. Times are medians of
``triton.testing.do_bench`` in microseconds; ``peak_gib`` is the memory the call allocates beyond its inputs. Each
implementation's output is checked against the reference's before it is timed. Needs a CUDA device.
"""

from __future__ import annotations

import functools
import sys

import torch

from results_file import benchmark_arguments, print_time_and_peak_table, run_gpu_benchmark, time_and_peak

# (block_n, programs_per_sm) swept beside the default
TILINGS = ((32, 2), (128, 2), (64, 1), (64, 4))


def implementations() -> dict:
    from blip_fast.kernels import decode_attention as kernel
    from blip_fast.ops.decode_attention import decode_attention_sdpa

    impls = {"sdpa": decode_attention_sdpa, "reference": kernel.decode_attention_ref}
    if not kernel.HAS_TRITON:
        return impls
    impls["fast"] = kernel.decode_attention_forward
    for block_n, programs in TILINGS:
        tiling = kernel.DecodeTiling(block_n=block_n, programs_per_sm=programs)
        impls[f"fast[bn{block_n},p{programs}]"] = functools.partial(kernel.decode_attention_forward, tiling=tiling)
    return impls


@torch.no_grad()
def run() -> list[dict]:
    from blip_fast.ops.decode_attention import decode_attention_op

    records = []
    impls = implementations()
    generator = torch.Generator().manual_seed(0)
    for case in decode_attention_op.parity_cases:
        (q, k, v, mask), _ = case.make_inputs(torch.device("cuda"), torch.bfloat16, generator)
        expected = impls["reference"](q, k, v, mask).float()
        name = f"{case.mode}_{case.shape.replace(' ', '_')}"
        for impl, fn in impls.items():
            out = fn(q, k, v, mask).float()
            if not torch.allclose(out, expected, rtol=2e-2, atol=2e-2):  # no timing for a wrong answer
                raise RuntimeError(f"{impl} differs from the reference on {name} by "
                                   f"{(out - expected).abs().max().item():.3g}")
            records += time_and_peak(name, impl, functools.partial(fn, q, k, v, mask))
    return records


def print_table(records: list[dict]) -> None:
    print_time_and_peak_table(records, impl_width=16)


def main(argv: list[str] | None = None) -> int:
    args = benchmark_arguments(__doc__).parse_args(argv)
    return run_gpu_benchmark("decode_attention", "kernels", argv, args.json, run, print_table)


if __name__ == "__main__":
    sys.exit(main())
