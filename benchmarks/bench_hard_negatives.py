"""Benchmark of hard-negative sampling for BLIP's ITM loss (one negative per row of the ITC logits).

Implementations, each timed as the training step uses it (draw the randomness, pick the negatives):

* ``original``  -- ``models/blip_pretrain.py``: softmax + 1e-4, zeroed diagonal, then one
  ``torch.multinomial(...).item()`` per row, i.e. B host synchronisations;
* ``reference`` -- ``sample_hard_negatives_ref``: inverse-CDF sampling in pure PyTorch, no sync;
* ``fast``      -- the Triton kernel; ``cuda`` -- the CUDA kernel of ``blip_fast._C``.

    python benchmarks/bench_hard_negatives.py [--dtype bfloat16] [--json PATH]

with PATH like ``benchmarks/results/kernels-h100-YYYYMMDD.json``.
Times are medians of ``triton.testing.do_bench`` in microseconds; the results file follows
``docs/results-format.md`` (suite ``kernels``, metric ``us``). Needs a CUDA device.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from blip_fast.shapes import PRETRAIN_BATCH

from results_file import benchmark_arguments, run_gpu_benchmark

# (B, N): BLIP base pretraining batches per GPU, in-batch negatives
CASES = ((PRETRAIN_BATCH, PRETRAIN_BATCH), (3 * PRETRAIN_BATCH, 3 * PRETRAIN_BATCH))
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def original(sim: torch.Tensor) -> list[int]:
    """The original per-row loop (``BLIP_Pretrain.forward``), kept for timing only."""
    weights = F.softmax(sim.float(), dim=1) + 1e-4
    weights.fill_diagonal_(0)
    return [torch.multinomial(weights[b], 1).item() for b in range(sim.shape[0])]


def implementations() -> dict:
    """name -> fn(sim), for every implementation that can run here."""
    from blip_fast.kernels.hard_negatives import (
        HAS_TRITON,
        sample_hard_negatives_ref,
        sample_hard_negatives_triton,
    )
    from blip_fast.ops import native

    def with_uniforms(sample):
        return lambda sim: sample(sim, torch.rand(sim.shape[0], device=sim.device))

    impls = {"original": original, "reference": with_uniforms(sample_hard_negatives_ref)}
    if HAS_TRITON:
        impls["fast"] = with_uniforms(sample_hard_negatives_triton)
    if native.HAS_NATIVE and native._C.built_with_cuda():
        impls["cuda"] = with_uniforms(native._C.sample_hard_negatives)
    return impls


def make_sim(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """ITC-like logits (never all zeros): a spread of several units, positives on the diagonal."""
    generator = torch.Generator().manual_seed(0)
    sim = 4.0 * torch.randn(rows, cols, generator=generator)
    sim[:, :rows] += 8.0 * torch.eye(rows)
    return sim.to("cuda", dtype)


def run(dtype: torch.dtype) -> list[dict]:
    import triton.testing

    records = []
    impls = implementations()
    for rows, cols in CASES:
        sim = make_sim(rows, cols, dtype)
        case = f"hard_negatives_b{rows}" + ("" if cols == rows else f"_n{cols}")
        case += "" if dtype == torch.float32 else f"_{str(dtype).removeprefix('torch.')}"
        for impl, fn in impls.items():
            picks = torch.as_tensor(fn(sim), device="cpu")
            if (picks == torch.arange(rows)).any():  # a broken kernel must not produce a timing
                raise RuntimeError(f"{impl} picked a positive as negative on {case}")
            median_ms = triton.testing.do_bench(lambda fn=fn, sim=sim: fn(sim), return_mode="median")
            records.append({"case": case, "impl": impl, "metric": "us", "value": round(median_ms * 1e3, 2)})
    return records


def print_table(records: list[dict]) -> None:
    print(f"{'case':<28} {'impl':<10} {'us':>10} {'vs original':>12}")
    baseline = {r["case"]: r["value"] for r in records if r["impl"] == "original"}
    for r in records:
        speedup = baseline[r["case"]] / r["value"]
        print(f"{r['case']:<28} {r['impl']:<10} {r['value']:>10.2f} {speedup:>11.1f}x")


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_arguments(__doc__)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the logits")
    args = parser.parse_args(argv)
    return run_gpu_benchmark("hard_negatives", "kernels", argv, args.json, lambda: run(DTYPES[args.dtype]),
                             print_table)


if __name__ == "__main__":
    sys.exit(main())
