"""Benchmark of BLIP's ITC loss over the momentum queue, forward and backward.

Implementations, each run as the pretraining step runs it (fp32 features and fp32 queues, bf16 autocast, gradients
of both modalities' features and of the temperature):

* ``reference`` -- ``itc_loss_ref``: the (B, B + Q) similarity matrices, their softmaxes and log-softmaxes;
* ``inductor``  -- the same function under ``torch.compile``;
* ``fast``      -- the streaming Triton kernels (``blip_fast.kernels.contrastive``) at their default tiling, and
  ``fast[bmM,bnN,wW]`` at other block sizes and warp counts, to choose the default from.

The goal (issue 19): fast <= 150 us at batch 96, queue 57,600.

    python benchmarks/bench_itc_loss.py [--json PATH]

with PATH like ``benchmarks/results/losses-h100-YYYYMMDD-itc.json``. Times are medians of
``triton.testing.do_bench`` (forward + backward) in microseconds; ``peak_gib`` is the memory the call allocates
beyond its inputs. Every implementation's loss is checked against the reference's before it is timed. Needs a
CUDA device.
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F

from blip_fast.shapes import EMBED_DIM, PRETRAIN_BATCH, QUEUE_SIZE

from results_file import benchmark_arguments, print_time_and_peak_table, run_gpu_benchmark, time_and_peak

# (batch, queue, with image ids): pretraining per GPU; retrieval fine-tuning (batch 32, positives by image id); a
# larger per-GPU batch
CASES = ((PRETRAIN_BATCH, QUEUE_SIZE, False), (32, QUEUE_SIZE, True), (256, QUEUE_SIZE, False))
# tilings swept beside the default, bf16 products (the step's): (block_m, block_n, num_warps, num_stages); each fits
# an SM's shared memory (tests/kernels/test_gpu_compile.py checks the defaults' the same way)
TILINGS = ((32, 32, 4, 1), (16, 32, 4, 2), (32, 64, 4, 2), (16, 64, 4, 2), (64, 32, 8, 2))


def implementations() -> dict:
    from blip_fast.kernels import contrastive
    from blip_fast.ops.losses import itc_loss_ref, itc_loss_triton

    impls = {"reference": itc_loss_ref, "inductor": torch.compile(itc_loss_ref)}
    if not contrastive.HAS_TRITON:
        return impls
    impls["fast"] = itc_loss_triton
    for block_m, block_n, warps, stages in TILINGS:
        tiling = contrastive.Tiling(block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages)
        if tiling != contrastive.DEFAULT_TILINGS[torch.bfloat16]:
            impls[f"fast[bm{block_m},bn{block_n},w{warps},s{stages}]"] = functools.partial(_tiled, tiling)
    return impls


def _tiled(tiling, *args):
    """The Triton op with bf16 products at ``tiling`` for this call (the host functions read the default per call)."""
    from blip_fast.kernels import contrastive
    from blip_fast.ops.losses import itc_loss_triton

    default = contrastive.DEFAULT_TILINGS[torch.bfloat16]
    contrastive.DEFAULT_TILINGS[torch.bfloat16] = tiling
    try:
        return itc_loss_triton(*args)
    finally:
        contrastive.DEFAULT_TILINGS[torch.bfloat16] = default


def make_inputs(batch: int, queue: int, with_ids: bool):
    """Normalised features, momentum twins near them, full queues, temp 0.07; image ids two captions per image."""
    generator = torch.Generator().manual_seed(0)

    def feat(*shape, along=-1):
        return F.normalize(torch.randn(*shape, generator=generator), dim=along)

    image, text = feat(batch, EMBED_DIM), feat(batch, EMBED_DIM)
    image_m = F.normalize(image + 0.3 * feat(batch, EMBED_DIM), dim=-1)
    text_m = F.normalize(text + 0.3 * feat(batch, EMBED_DIM), dim=-1)
    queues = [feat(EMBED_DIM, queue, along=0), feat(EMBED_DIM, queue, along=0)]
    ids = None
    if with_ids:
        ids = (torch.arange(batch) // 2, torch.randint(0, 10 * batch, (queue,), generator=generator))
    tensors = [t.to("cuda") for t in (image, text, image_m, text_m, *queues)]
    temp = torch.tensor(0.07, device="cuda", requires_grad=True)
    return tensors, temp, None if ids is None else [i.to("cuda") for i in ids]


def step(loss_fn, tensors, temp, ids):
    image, text = tensors[0], tensors[1]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = loss_fn(image, text, *tensors[2:], temp, 0.4, *(ids or ()))[0]
    return loss, torch.autograd.grad(loss, [image, text, temp])


def run() -> list[dict]:
    records = []
    impls = implementations()
    for batch, queue, with_ids in CASES:
        case = f"itc_b{batch}_q{queue}_d{EMBED_DIM}" + ("_ids" if with_ids else "")
        tensors, temp, ids = make_inputs(batch, queue, with_ids)
        tensors[0].requires_grad_()
        tensors[1].requires_grad_()
        expected, _ = step(impls["reference"], tensors, temp, ids)
        for impl, fn in impls.items():
            loss, _ = step(fn, tensors, temp, ids)  # also compiles
            if not torch.allclose(loss.float(), expected.float(), rtol=1e-2):  # no timing for a wrong answer
                raise RuntimeError(f"{impl} gives loss {loss.item()} on {case}, the reference {expected.item()}")
            records += time_and_peak(case, impl, functools.partial(step, fn, tensors, temp, ids))
    return records


def print_table(records: list[dict]) -> None:
    print_time_and_peak_table(records, impl_width=26)  # the tilings' names are long


def main(argv: list[str] | None = None) -> int:
    args = benchmark_arguments(__doc__).parse_args(argv)
    return run_gpu_benchmark("itc_loss", "losses", argv, args.json, run, print_table)


if __name__ == "__main__":
    sys.exit(main())
