"""Benchmark of BLIP's image transforms: JPEG bytes in, normalised (B, 3, S, S) batches out.

Implementations (``impl`` in the results):

* ``fast``     -- DALI on the GPU: ``mixed`` decoder (nvJPEG + the hardware JPEG engine), GPU operators;
* ``dali_cpu`` -- the same DALI pipeline on the CPU (``device_id=None``);
* ``pil``      -- the PIL fallback (:class:`PilTransformLoader`) with N worker processes.

Cases: ``pretrain_224`` (random-resized-crop 0.2-1.0, flip, RandomAugment(2, 5), 224 px, fp16 on the
GPU / fp32 on the CPU) and ``eval_384`` (bicubic resize to 384 px, no crop) time the transform
loaders alone. ``captions_pretrain_224`` times the whole training input path,
:class:`~blip_fast.data.batches.CaptionBatches` over a BLIP JSON caption list: files read by N
DataLoader workers, captions chosen, cleaned and tokenized, images transformed (by the workers for
``pil``, by DALI for the others), resumable state kept per batch. Its list repeats the JPEG files
(the page cache serves the repeats) so that one epoch outlasts the timed runs.

Inputs: ``photo_like_jpeg`` (blip_fast.data.synthetic), 640x480 at quality 90 (about 100 kB each): a
smooth colour field, a dozen shapes, blur and grain -- photo-like in size and entropy, never all zero.
Each timed run transforms ``--batches`` batches (cycling over the JPEGs) after a warm-up run; the
figure is the median of ``--runs`` runs, in images per second, outputs materialised (GPU: synchronised).

    python benchmarks/bench_data.py [ARGS]

calls :func:`main` with ``ARGS``: ``--impls fast,dali_cpu,pil`` ``--cases pretrain_224,eval_384,
captions_pretrain_224`` ``--workers 1,16`` (PIL processes; DataLoader workers of the captions case)
``--threads N`` ``--prefetch N`` ``--hw-decoder-load F`` ``--no-fancy-upsampling`` ``--batch-size N``
``--batches N`` ``--runs N`` ``--images N`` ``--json PATH``, with PATH like
``benchmarks/results/data-h100-YYYYMMDD.json`` (suite ``data``, format: docs/results-format.md). ``main``
returns 0, or 1 when no implementation could run here.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from blip_fast.data.batches import CaptionBatches, open_caption_source
from blip_fast.data.dali_pipeline import HAS_DALI, DaliOptions, DaliTransformLoader, PilTransformLoader
from blip_fast.data.synthetic import photo_like_jpeg
from blip_fast.data.transforms import TransformConfig
from blip_fast.shapes import FINETUNE_IMAGE_SIZE, PRETRAIN_IMAGE_SIZE

from results_file import command_line, device_name, write_results

IMPLS = ("fast", "dali_cpu", "pil")
CASES = {
    "pretrain_224": lambda dtype: TransformConfig.pretrain(PRETRAIN_IMAGE_SIZE, dtype=dtype),
    "eval_384": lambda dtype: TransformConfig.eval(FINETUNE_IMAGE_SIZE, dtype=dtype),
}
CAPTION_CASES = {
    "captions_pretrain_224": lambda dtype: TransformConfig.pretrain(PRETRAIN_IMAGE_SIZE, dtype=dtype),
}



def batches(jpegs: list[bytes], batch_size: int):
    """An endless stream of ``(jpeg bytes, indices)`` batches cycling over ``jpegs``."""
    order = itertools.cycle(range(len(jpegs)))
    while True:
        picks = [next(order) for _ in range(batch_size)]
        yield [jpegs[i] for i in picks], picks


def make_loader(impl: str, config: TransformConfig, source, args, workers: int):
    if impl == "pil":
        return PilTransformLoader(config, source, num_workers=workers, seed=0)
    return DaliTransformLoader(config, source, dali_options(impl, args, args.batch_size))


def dali_options(impl: str, args, batch_size: int) -> DaliOptions:
    return DaliOptions(batch_size=batch_size, device="gpu" if impl == "fast" else "cpu", num_threads=args.threads,
                       prefetch_queue_depth=args.prefetch, hw_decoder_load=args.hw_decoder_load,
                       jpeg_fancy_upsampling=not args.no_fancy_upsampling, seed=0)


def write_caption_list(folder: Path, jpegs: list[bytes], samples: int) -> Path:
    """A BLIP caption list of ``samples`` entries over the ``jpegs`` (written once each), captions of 8-27 words."""
    words = ("a smooth field of colour with circles and triangles in many hues blurred a little and grainy "
             "like a photograph taken in the evening light").split()
    for i, data in enumerate(jpegs):
        (folder / f"{i}.jpg").write_bytes(data)
    entries = [{"image": f"{i % len(jpegs)}.jpg", "caption": f"picture {i}: " + " ".join(words[:6 + i % 20])}
               for i in range(samples)]
    path = folder / "captions.json"
    path.write_text(json.dumps(entries))
    return path


def caption_batches(impl: str, config: TransformConfig, source, args, workers: int):
    """An endless stream of ``(images, input_ids)`` from :class:`CaptionBatches`, epoch after epoch."""
    dali = None if impl == "pil" else dali_options(impl, args, args.batch_size)
    loader = CaptionBatches(source, config, args.batch_size, backend="pil" if impl == "pil" else "dali",
                            num_workers=workers, dali=dali)
    while True:
        for batch in loader:
            yield batch.images, batch.input_ids


def time_runs(iterator, batches_per_run: int, runs: int, batch_size: int, cuda: bool) -> list[float]:
    """images/s of ``runs`` timed runs of ``batches_per_run`` batches each, after one warm-up run."""
    rates = []
    for run in range(runs + 1):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        checksum = 0.0
        for _ in range(batches_per_run):
            images, _ = next(iterator)
            checksum = checksum + images[:, :, 0, 0].float().sum()   # touch every batch; no host sync
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if not torch.isfinite(torch.as_tensor(checksum)).item():      # after the clock stopped
            raise RuntimeError("non-finite values in the transformed images")
        if run:                                         # run 0 is the warm-up
            rates.append(batches_per_run * batch_size / elapsed)
    return rates


def available(impl: str) -> str | None:
    """Why ``impl`` cannot run here, or None."""
    if impl in ("fast", "dali_cpu") and not HAS_DALI:
        return "NVIDIA DALI is not installed (pip install nvidia-dali-cuda130==2.4.0)"
    if impl == "fast" and not torch.cuda.is_available():
        return "no CUDA device"
    return None


def run(args) -> list[dict]:
    jpegs = [photo_like_jpeg(seed) for seed in range(args.images)]
    print(f"{len(jpegs)} JPEGs, 640x480, mean {np.mean([len(j) for j in jpegs]) / 1e3:.0f} kB")
    records = []
    with tempfile.TemporaryDirectory(prefix="bench_data_") as folder:
        caption_source = None
        if set(args.cases) & set(CAPTION_CASES):
            # one epoch covers the warm-up and timed runs, plus each worker's dropped last batch
            samples = ((args.runs + 1) * args.batches + max(args.workers) + 1) * args.batch_size
            caption_source = open_caption_source("json", write_caption_list(Path(folder), jpegs, samples), folder)
        for case in args.cases:
            for impl in args.impls:
                reason = available(impl)
                if reason:
                    print(f"skipping {impl} on {case}: {reason}")
                    continue
                dtype = "float16" if impl == "fast" else "float32"
                end_to_end = case in CAPTION_CASES
                for workers in (args.workers if impl == "pil" or end_to_end else [0]):
                    if end_to_end:
                        iterator = caption_batches(impl, CAPTION_CASES[case](dtype), caption_source, args, workers)
                    else:
                        iterator = iter(make_loader(impl, CASES[case](dtype), batches(jpegs, args.batch_size), args,
                                                    workers))
                    rates = time_runs(iterator, args.batches, args.runs, args.batch_size, cuda=impl == "fast")
                    iterator.close()
                    params = {"batch_size": args.batch_size}
                    if impl == "pil" or end_to_end:
                        params["workers"] = workers
                    if impl != "pil":
                        params.update(threads=args.threads, prefetch=args.prefetch)
                    if impl == "fast":
                        params.update(hw_decoder_load=args.hw_decoder_load,
                                      jpeg_fancy_upsampling=not args.no_fancy_upsampling)
                    records.append({"case": case, "impl": impl, "metric": "images_per_s",
                                    "value": round(statistics.median(rates), 1), "params": params})
    return records


def print_table(records: list[dict]) -> None:
    print(f"\n{'case':<22} {'impl':<9} {'setting':<22} {'images/s':>10} {'vs best pil':>12}")
    for r in records:
        best_pil = max((q["value"] for q in records if q["case"] == r["case"] and q["impl"] == "pil"), default=None)
        setting = ", ".join(f"{r['params'][name]} {name}" for name in ("workers", "threads") if name in r["params"])
        ratio = f"{r['value'] / best_pil:.1f}x" if best_pil else "-"
        print(f"{r['case']:<22} {r['impl']:<9} {setting:<22} {r['value']:>10.1f} {ratio:>12}")


def _csv(kind, choices=None):
    def parse(text: str):
        items = [kind(item) for item in text.split(",") if item]
        if choices is not None and not set(items) <= set(choices):
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}")
        return items
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impls", type=_csv(str, IMPLS), default=list(IMPLS), help="comma list of " + ",".join(IMPLS))
    cases = (*CASES, *CAPTION_CASES)
    parser.add_argument("--cases", type=_csv(str, cases), default=list(cases), help="comma list of " + ",".join(cases))
    parser.add_argument("--workers", type=_csv(int), default=[os.cpu_count() or 1],
                        help="comma list of PIL worker-process counts, and of DataLoader workers of the captions "
                        "case (default: all cores)")
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), help="DALI CPU threads")
    parser.add_argument("--prefetch", type=int, default=2, help="DALI prefetch queue depth")
    parser.add_argument("--hw-decoder-load", type=float, default=1.0, help="share of JPEGs for the hardware decoder")
    parser.add_argument("--no-fancy-upsampling", action="store_true",
                        help="mixed decoder: nvJPEG's own chroma upsampling instead of libjpeg-turbo's")
    parser.add_argument("--batch-size", type=int, default=128, help="images per batch")
    parser.add_argument("--batches", type=int, default=20, help="batches per timed run")
    parser.add_argument("--runs", type=int, default=5, help="timed runs (the median is reported)")
    parser.add_argument("--images", type=int, default=256, help="distinct JPEGs to cycle over")
    parser.add_argument("--json", metavar="PATH", help="write the results file (format: docs/results-format.md) here")
    args = parser.parse_args(argv)

    records = run(args)
    if not records:
        print("bench_data: nothing could run here", file=sys.stderr)
        return 1
    print_table(records)
    if args.json:
        write_results(args.json, "data", device_name(), command_line("data", argv), records, dali=_dali_version(),
                      cpu_cores=os.cpu_count())
        print(f"wrote {args.json}")
    return 0


def _dali_version() -> str:
    if not HAS_DALI:
        return "not installed"
    import nvidia.dali

    return nvidia.dali.__version__


if __name__ == "__main__":
    sys.exit(main())
