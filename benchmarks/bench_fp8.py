"""``python benchmarks/bench_fp8.py``: the ViT's linear layers in FP8 (``train.fp8_vit``) against bf16: the loss
curve and the step time, from the same start on the same batches.

    python benchmarks/bench_fp8.py --json benchmarks/results/step-h100-YYYYMMDD-fp8.json     # a GPU, ViT-B/16 224
    python benchmarks/bench_fp8.py --preset tiny --image-size 64 --batch 16 --queue 96 --steps 40 --window 10 \\
        --timed 10 --device cpu --no-compile

Two impls, each the pretraining step as ``blip-fast pretrain`` assembles it (bench_step.py's ``fast``: bf16 autocast,
packed captions, joint passes, every block compiled, on CUDA the step graphed): ``bf16``, and ``fp8`` with
``train.fp8_vit`` (blip_fast.models.fp8). Both start from one set of random weights and train ``--steps`` AdamW steps
(lr 1e-4) over ``--batches`` synthetic batches in turn, seeded alike. The losses are read back only at the end.

The loss-curve check: each loss (ITC, ITM, LM) averaged over windows of ``--window`` steps; ``max_rel_diff`` is the
largest relative difference of an FP8 window from bf16's, and the run fails (exit 1) where it exceeds
``--tolerance`` (default 2%): FP8 is adopted only where it trains as bf16 does. Step time: the median of the last
``--timed`` steps, each bracketed by a synchronisation. Results file suite ``step`` (docs/results-format.md).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

from blip_fast.models.blip_pretrain import BlipPretrain
from blip_fast.train.config import OptimConfig, TrainConfig
from blip_fast.train.pretraining import PACKED_TOKENS_MULTIPLE, PACKED_TOKENS_MULTIPLE_GRAPHED

from bench_step import add_model_arguments, make_batch, model_config, speed_applied_step
from results_file import command_line, device_name, write_results

LOSSES = ("itc", "itm", "lm")


def train(model, fp8: bool, batches: list, device: torch.device, steps: int, timed: int, compile_blocks: bool):
    """(losses (steps, 3) on the host, median seconds of the last ``timed`` steps)."""
    graphed = device.type == "cuda"
    settings = TrainConfig(precision="bf16", compile=compile_blocks, cuda_graph=graphed, fp8_vit=fp8)
    run_step = speed_applied_step(model, settings, OptimConfig(init_lr=1e-4), device)
    losses, times = [], []
    for step in range(steps):
        timing = step >= steps - timed
        if timing and device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        losses.append(run_step(batches[step % len(batches)]))
        if timing:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    return torch.stack(losses).float().cpu(), statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/bench_fp8.py", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--steps", type=int, default=150, help="training steps per impl")
    parser.add_argument("--batches", type=int, default=10, help="distinct batches, used in turn")
    parser.add_argument("--window", type=int, default=25, help="steps per loss window")
    parser.add_argument("--timed", type=int, default=30, help="last steps timed")
    parser.add_argument("--tolerance", type=float, default=0.02, help="largest relative window difference allowed")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the results file here")
    args = parser.parse_args(argv)
    if args.steps < args.window or args.steps < args.timed or min(args.window, args.timed, args.batches) < 1:
        parser.error("--steps must cover --window and --timed, each at least 1; --batches at least 1")
    device = torch.device(args.device)
    config = model_config(args)
    multiple = PACKED_TOKENS_MULTIPLE_GRAPHED if device.type == "cuda" else PACKED_TOKENS_MULTIPLE
    batches = [make_batch(args.batch, args.image_size, device, "longest", seed=seed, pack_multiple=multiple)
               for seed in range(args.batches)]
    torch.manual_seed(0)
    start = BlipPretrain(config).to(device).train()
    curves, step_s = {}, {}
    for impl in ("bf16", "fp8"):
        torch.manual_seed(1)  # dropout and the samplers draw alike in both
        curves[impl], step_s[impl] = train(copy.deepcopy(start), impl == "fp8", batches, device, args.steps,
                                           args.timed, not args.no_compile)
    windows = args.steps // args.window
    means = {impl: c[: windows * args.window].view(windows, args.window, 3).mean(1) for impl, c in curves.items()}
    diff = ((means["fp8"] - means["bf16"]).abs() / means["bf16"].abs()).max().item()
    case = f"pretrain_{args.preset}{args.image_size}_b{args.batch}_{args.steps}steps"
    records = [{"case": case, "impl": impl, "metric": "samples_per_s", "value": args.batch / step_s[impl]}
               for impl in step_s]
    records.append({"case": case, "impl": "fp8", "metric": "max_rel_diff", "value": diff, "against": "bf16"})
    for impl, mean in means.items():
        for window, row in enumerate(mean.tolist()):
            records += [{"case": case, "impl": impl, "metric": f"loss_{name}", "value": value,
                         "steps": [window * args.window + 1, (window + 1) * args.window]}
                        for name, value in zip(LOSSES, row, strict=True)]
    print(f"{case} on {device_name(device)}, torch {torch.__version__}")
    print(f"{'window':>12} " + " ".join(f"{impl}_{name:<4}" for impl in means for name in LOSSES))
    for window in range(windows):
        row = [f"{value:9.4f}" for impl in means for value in means[impl][window].tolist()]
        print(f"{window * args.window + 1:>5}-{(window + 1) * args.window:<6} " + " ".join(row))
    print(f"samples/s: bf16 {args.batch / step_s['bf16']:.1f}, fp8 {args.batch / step_s['fp8']:.1f}; "
          f"largest window difference {diff:.2%} (tolerance {args.tolerance:.0%})")
    if args.json:
        write_results(args.json, "step", device_name(device), command_line("fp8", argv), records,
                      tolerance=args.tolerance, passed=diff <= args.tolerance)
    return 0 if diff <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
