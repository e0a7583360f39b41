"""Benchmark of BLIP's LM loss: vocabulary projection + smoothed cross-entropy, forward and backward.

Implementations, each run as the pretraining step runs it (fp32 master weights under bf16 autocast,
label smoothing 0.1, ~45% of the targets padding, gradients of hidden states, weight and bias):

* ``reference`` -- ``lm_loss_ref``: ``F.linear``, then ``F.cross_entropy`` on an fp32 copy of the logits;
* ``inductor``  -- the same function under ``torch.compile`` (inductor fuses the cross-entropy);
* ``fast``      -- the fused linear + cross-entropy (``blip_fast.kernels.lm_loss``, Triton): chunks of
  logits, the gradient written over them in place.

    python benchmarks/bench_lm_loss.py [--json PATH]

with PATH like ``benchmarks/results/losses-h100-YYYYMMDD.json``. Times are medians of
``triton.testing.do_bench`` (forward + backward) in microseconds; ``peak_gib`` is the memory the
call allocates beyond its inputs (``torch.cuda.max_memory_allocated``). Needs a CUDA device.
"""

from __future__ import annotations

import functools
import sys

import torch

from blip_fast.shapes import BASE_WIDTH, FINETUNE_TEXT_LENGTH, PRETRAIN_BATCH, PRETRAIN_TEXT_LENGTH, VOCAB_SIZE

from results_file import benchmark_arguments, print_time_and_peak_table, run_gpu_benchmark, time_and_peak

# (batch, text length): BLIP base pretraining per GPU (captions up to 30 tokens, 35 in fine-tuning)
CASES = ((PRETRAIN_BATCH, PRETRAIN_TEXT_LENGTH), (PRETRAIN_BATCH, FINETUNE_TEXT_LENGTH),
         (3 * PRETRAIN_BATCH, PRETRAIN_TEXT_LENGTH))
PAD_FRACTION = 0.45  # real captions average ~12-15 tokens of the 30


def implementations() -> dict:
    from blip_fast.kernels.lm_loss import HAS_TRITON, lm_loss_ref
    from blip_fast.ops.lm_loss import lm_loss_triton

    impls = {"reference": lm_loss_ref, "inductor": torch.compile(lm_loss_ref)}
    if HAS_TRITON:
        impls["fast"] = lm_loss_triton
    return impls


def make_inputs(rows: int):
    """Decoder-like inputs (never all zeros): LayerNorm-scale hidden states, BERT-init weights."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, BASE_WIDTH, generator=generator)
    weight = 0.02 * torch.randn(VOCAB_SIZE, BASE_WIDTH, generator=generator)
    bias = 0.02 * torch.randn(VOCAB_SIZE, generator=generator)
    targets = torch.randint(0, VOCAB_SIZE, (rows,), generator=generator)
    targets[torch.rand(rows, generator=generator) < PAD_FRACTION] = -100
    return [t.to("cuda") for t in (hidden, weight, bias, targets)]


def step(loss_fn, leaves, targets):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = loss_fn(*leaves, targets, 0.1, "mean")
    return loss, torch.autograd.grad(loss, leaves)


def run() -> list[dict]:
    records = []
    impls = implementations()
    for batch, length in CASES:
        rows = batch * (length - 1)  # position t predicts token t + 1
        case = f"lm_loss_b{batch}_l{length}_v{VOCAB_SIZE}"
        hidden, weight, bias, targets = make_inputs(rows)
        leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
        expected, _ = step(impls["reference"], leaves, targets)
        for impl, fn in impls.items():
            loss, _ = step(fn, leaves, targets)  # also compiles
            if not torch.allclose(loss.float(), expected.float(), rtol=1e-2):  # no timing for a wrong answer
                raise RuntimeError(f"{impl} gives loss {loss.item()} on {case}, the reference {expected.item()}")
            records += time_and_peak(case, impl, functools.partial(step, fn, leaves, targets))
    return records


def main(argv: list[str] | None = None) -> int:
    args = benchmark_arguments(__doc__).parse_args(argv)
    return run_gpu_benchmark("lm_loss", "losses", argv, args.json, run, print_time_and_peak_table)


if __name__ == "__main__":
    sys.exit(main())
