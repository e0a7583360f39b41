"""Benchmark of BERT's sublayer output, ``LayerNorm(dropout(x) + residual)``, on the GPU.

Implementations:

* ``reference`` -- the eager chain (dropout, add, LayerNorm): what every text sublayer runs without compile;
* ``inductor``  -- the same function under ``torch.compile`` (what a compiled block fuses it into);
* ``fast``      -- the one-pass Triton kernels (``blip_fast.kernels.residual_layer_norm``).

Cases: training (forward + backward, dropout 0.1, a bf16 projection output on the fp32 residual stream under bf16
autocast) at pretraining's text rows and at a fine-tuning batch; inference (forward only, no dropout) at a decoding
step's rows (32 images x 3 beams, one token) and at an evaluation batch. The kernel is registered ``auto=False``:
``auto`` adopts it where this benchmark, and the eager paths' own timings, show it faster.

    python benchmarks/bench_residual_layer_norm.py [--json PATH]

with PATH like ``benchmarks/results/kernels-h100-YYYYMMDD-residual-layer-norm.json``. Times are medians of
``triton.testing.do_bench`` in microseconds; ``peak_gib`` is the memory the call allocates beyond its inputs. Each
implementation's output is checked against the reference's before it is timed (dropout off for that check). Needs a
CUDA device.
"""

from __future__ import annotations

import functools
import sys

import torch

from blip_fast.shapes import BASE_WIDTH, FINETUNE_TEXT_LENGTH, PRETRAIN_BATCH, PRETRAIN_TEXT_LENGTH

from results_file import benchmark_arguments, print_time_and_peak_table, run_gpu_benchmark, time_and_peak

# (name, rows, training): training cases run forward + backward with dropout 0.1
CASES = (("train_pretrain_text", PRETRAIN_BATCH * PRETRAIN_TEXT_LENGTH, True),
         ("train_finetune_text", 32 * FINETUNE_TEXT_LENGTH, True),
         ("infer_decode_step", 32 * 3, False),
         ("infer_eval_text", 256 * FINETUNE_TEXT_LENGTH, False))
EPS = 1e-12  # BERT's


def implementations() -> dict:
    from blip_fast.kernels import residual_layer_norm as kernel
    from blip_fast.ops.residual_layer_norm import residual_layer_norm_triton

    impls = {"reference": kernel.residual_layer_norm_ref, "inductor": torch.compile(kernel.residual_layer_norm_ref)}
    if kernel.HAS_TRITON:
        impls["fast"] = residual_layer_norm_triton
    return impls


def make_inputs(rows: int, training: bool):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, BASE_WIDTH, generator=generator).to("cuda", torch.bfloat16)
    residual = torch.randn(rows, BASE_WIDTH, generator=generator).cuda()
    weight = (1.0 + 0.1 * torch.randn(BASE_WIDTH, generator=generator)).cuda()
    bias = (0.1 * torch.randn(BASE_WIDTH, generator=generator)).cuda()
    tensors = [x, residual, weight, bias]
    if training:
        for t in tensors:
            t.requires_grad_()
    return tensors


def call(fn, tensors, training: bool, dropout_p: float):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fn(*tensors, EPS, dropout_p)
    if training:
        torch.autograd.grad(out.float().sum(), tensors)
    return out


def run() -> list[dict]:
    records = []
    impls = implementations()
    for name, rows, training in CASES:
        tensors = make_inputs(rows, training)
        expected = call(impls["reference"], tensors, False, 0.0).float()
        dropout_p = 0.1 if training else 0.0
        for impl, fn in impls.items():
            out = call(fn, tensors, False, 0.0).float()  # also compiles
            if not torch.allclose(out, expected, rtol=1e-3, atol=1e-3):  # no timing for a wrong answer
                raise RuntimeError(f"{impl} differs from the reference on {name} by "
                                   f"{(out - expected).abs().max().item():.3g}")
            records += time_and_peak(f"{name}_r{rows}_h{BASE_WIDTH}", impl,
                                     functools.partial(call, fn, tensors, training, dropout_p))
    return records


def print_table(records: list[dict]) -> None:
    print_time_and_peak_table(records)


def main(argv: list[str] | None = None) -> int:
    args = benchmark_arguments(__doc__).parse_args(argv)
    return run_gpu_benchmark("residual_layer_norm", "kernels", argv, args.json, run, print_table)


if __name__ == "__main__":
    sys.exit(main())
