"""Benchmark of the main job end to end: a whole pretraining run and its zero-shot retrieval.

    python benchmarks/bench_pretrain.py --json benchmarks/results/eval-cpu-YYYYMMDD.json
    python benchmarks/bench_pretrain.py --config base data.paths=[...] train.max_steps=1000 --json ...   (any config)

Runs ``blip-fast pretrain`` with the given config (default: the built-in ``tiny-synthetic``, which
writes its dataset first) in a temporary run folder unless ``train.out`` is given, then writes one
results file (suite ``eval``, docs/results-format.md) from the run's summary: training samples/s
(optimizer steps x global batch / training wall time, data loading and logging included, the
dataset writing and the evaluation not), total wall seconds, and the evaluation's recalls in percent
(``txt_r1`` ... image->text, ``img_r1`` ... text->image, ``chance_r1``), all under impl ``fast``
(the engine's configured path). ``steady_samples_per_s`` leaves out the first ``--steady-after`` log windows
(``train.log_every`` steps each), where compilation, CUDA-graph captures and the loader's start-up fall: it is the
rate to set beside ``bench_step.py``'s, which times a batch already on the device. The file's ``data_backend`` says
what decoded and transformed the images (``dali_gpu``, ``dali_cpu`` or ``pil``).

On a GPU, the real loop from JPEG shards through DALI (``gpu_session.sh pretrain_real``)::

    python benchmarks/bench_pretrain.py --config base data.kind=shards 'data.paths=[...]' data.backend=dali \
        data.steps_per_epoch=200 train.max_steps=120 train.log_every=10 train.eval_size=0 --json ...
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from blip_fast.train.config import load_pretrain_config
from blip_fast.train.pretraining import pretrain

from results_file import command_line, device_name, write_results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/bench_pretrain.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as blip-fast pretrain")
    parser.add_argument("--config", help="YAML file or shipped config (default tiny-synthetic)")
    parser.add_argument("--json", help="write the results file here")
    parser.add_argument("--steady-after", type=int, default=2, metavar="N",
                        help="log windows left out of steady_samples_per_s (default 2)")
    args = parser.parse_args(argv)
    if args.steady_after < 0:
        parser.error("--steady-after must be >= 0")
    with tempfile.TemporaryDirectory(prefix="bench-pretrain-") as scratch:
        overrides = list(args.overrides)
        if not any(o.startswith("train.out=") for o in overrides):
            overrides.append(f"train.out={scratch}/run")
        config = load_pretrain_config(args.config, overrides)
        started = time.perf_counter()
        summary = pretrain(config)
        wall = time.perf_counter() - started
        windows = [json.loads(line) for line in (Path(config.train.out) / "metrics.jsonl").read_text().splitlines()]
    case = f"pretrain_{Path(args.config or 'tiny-synthetic').stem}_{summary.steps}x{config.data.batch_size}"
    records = [{"case": case, "impl": "fast", "metric": "samples_per_s", "value": summary.samples_per_s},
               {"case": case, "impl": "fast", "metric": "wall_s", "value": wall}]
    steady = steady_samples_per_s(windows, summary.samples / max(summary.steps, 1), args.steady_after)
    if steady is None:
        print(f"steady_samples_per_s: not recorded, the run logged {len(windows)} step window(s) and "
              f"--steady-after leaves out {args.steady_after}")
    else:
        records.append({"case": case, "impl": "fast", "metric": "steady_samples_per_s", "value": steady})
    if summary.evaluation:
        r = summary.evaluation
        eval_case = f"zero_shot_retrieval_{r['images']}img_itm{r['itm_k']}"
        records += [{"case": eval_case, "impl": "fast", "metric": k, "value": v} for k, v in r["metrics"].items()]
    print("\n".join(f"{x['case']:<40} {x['metric']:<14} {x['value']:.2f}" for x in records))
    if args.json:
        write_results(args.json, "eval", device_name(None if config.train.device == "auto" else config.train.device),
                      command_line("pretrain", argv), records,
                      threads=torch.get_num_threads(), data_backend=summary.data_backend)
    return 0


def steady_samples_per_s(windows: list[dict], samples_per_step: float, skip: int) -> float | None:
    """Samples/s over the step records of ``metrics.jsonl`` after the first ``skip`` (from the step and the elapsed
    time of the last one left out to those of the last); None with fewer than ``skip + 1`` records."""
    steps = [w for w in windows if "elapsed_s" in w]
    if len(steps) <= skip:
        return None
    first = steps[skip - 1] if skip else {"step": 0, "elapsed_s": 0.0}
    last = steps[-1]
    seconds = last["elapsed_s"] - first["elapsed_s"]
    return (last["step"] - first["step"]) * samples_per_step / seconds if seconds > 0 else None


if __name__ == "__main__":
    sys.exit(main())
