"""Benchmark of the retrieval evaluation: ITC similarity of every pair, then the top k of each image and of each
caption re-ranked by ITM, on COCO's shape (5,000 test images, 5 captions each, k = 256) or a smaller one.

    python benchmarks/bench_eval.py                                   # a GPU: ViT-B/16 384 px, 5k x 25k, k 256
    python benchmarks/bench_eval.py --preset tiny --image-size 64 --images 200 --k 16   # a CPU
    python benchmarks/bench_eval.py ... --json benchmarks/results/runs/eval-cpu-YYYYMMDD-retrieval.json

Impls, on the same random-weight BlipRetrieval, images of Gaussian noise and captions of the built-in scenes:

``original``  the algorithm of the original ``evaluation`` in ``train_retrieval.py`` run eagerly in fp32 (TF32 on
              CUDA): features in batches, then one ITM forward per image over its k candidate captions with the
              image's tokens repeated k times, and one per caption over its k candidate images;
``fast``      blip_fast.evaluation.retrieval.retrieval_scores: each image's cross-attention keys/values projected
              once and shared by its k candidates, the caption side batched over captions (bf16 autocast on CUDA).

Both give the same score matrices up to precision (printed, and recorded as ``max_abs_diff``). Timing: wall seconds
of the whole evaluation after one warm-up of the feature pass; peak memory from ``torch.cuda.max_memory_allocated``
(CUDA only). Results file: docs/results-format.md (suite ``eval``).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import time

import torch
import torch.nn.functional as F

from blip_fast.config import preset
from blip_fast.data.synthetic import caption, random_scene
from blip_fast.evaluation.retrieval import retrieval_scores, split_features
from blip_fast.models import BlipRetrieval
from blip_fast.text import BlipTokenizer

from results_file import command_line, device_name, write_results

IMPLS = ("original", "fast")


@torch.no_grad()
def original_scores(model, images, input_ids, attention_mask, k, batch_size):
    """The original ``evaluation`` (``train_retrieval.py``) on our modules: the same algorithm, none of our sharing."""
    device = next(model.parameters()).device
    # the features as the original computes them (in batches, once): only the re-ranking differs
    image_embeds, image_feat, text_feat = split_features(model, images, input_ids, attention_mask, batch_size)
    sims = image_feat @ text_feat.t()
    enc_ids, mask = model.with_enc(input_ids.to(device)), attention_mask.to(device)

    def itm(ids, atts, context):
        states = model.text_encoder(ids, atts, encoder_hidden_states=context)
        return model.itm_head(states[:, 0])[:, 1]

    score_i2t = torch.full_like(sims, -100.0)
    for i, row in enumerate(sims):
        top_sim, top = row.topk(k)
        score_i2t[i, top] = itm(enc_ids[top], mask[top], image_embeds[i].repeat(k, 1, 1)) + top_sim
    score_t2i = torch.full_like(sims.t(), -100.0)
    for t, row in enumerate(sims.t()):
        top_sim, top = row.topk(k)
        score_t2i[t, top] = itm(enc_ids[t].repeat(k, 1), mask[t].repeat(k, 1), image_embeds[top]) + top_sim
    return score_i2t.cpu(), score_t2i.cpu()


def captions(count: int) -> list[str]:
    rng = random.Random(0)
    return [caption(random_scene(rng)) for _ in range(count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/bench_eval.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="base", choices=("tiny", "base", "large"))
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--images", type=int, default=5000, help="test images (COCO: 5,000)")
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--k", type=int, default=256, help="candidates re-ranked by ITM (COCO: 256)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--impl", action="append", choices=IMPLS, help="only these (default: both)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the results file here (format: docs/results-format.md)")
    args = parser.parse_args(argv)
    if args.images < 2 or args.k < 1 or args.captions_per_image < 1:
        parser.error("--images >= 2, --k >= 1 and --captions-per-image >= 1")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the original's fp32 evaluation on Ampere and later
    torch.manual_seed(0)
    model = BlipRetrieval(preset(args.preset, image_size=args.image_size)).to(device).eval()
    images = torch.randn(args.images, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(1))
    tokens = BlipTokenizer()(captions(args.images * args.captions_per_image), max_length=35)
    k = min(args.k, args.images)
    case = f"retrieval_{args.preset}{args.image_size}_{args.images}img_{args.images * args.captions_per_image}txt_k{k}"
    records, scores = [], {}
    for impl in args.impl or IMPLS:
        fast = impl == "fast"
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if fast and device.type == "cuda"
                    else contextlib.nullcontext())
        evaluate = retrieval_scores if fast else original_scores
        with autocast:
            model.image_features(model.image_embeds(images[:2].to(device)))  # warm-up: kernels, allocator
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        with autocast:
            scores[impl] = evaluate(model, images, tokens.input_ids, tokens.attention_mask, k, args.batch_size)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
        records.append({"case": case, "impl": impl, "metric": "wall_s", "value": wall})
        if device.type == "cuda":
            records.append({"case": case, "impl": impl, "metric": "peak_gib",
                            "value": torch.cuda.max_memory_allocated() / 2**30})
        print(f"{impl:<9} {wall:9.2f} s" + (f"  peak {records[-1]['value']:.2f} GiB" if device.type == "cuda" else ""))
    if len(scores) == 2:
        # the same candidates re-ranked: compare where both scored (-100 elsewhere)
        diff = max(float((F.relu(a + 100) - F.relu(b + 100)).abs().max())
                   for a, b in zip(scores["fast"], scores["original"], strict=True))
        walls = {r["impl"]: r["value"] for r in records if r["metric"] == "wall_s"}
        speedup = walls["original"] / walls["fast"]
        print(f"fast vs original: {speedup:.1f}x faster, scores within {diff:.2e}")
        records.append({"case": case, "impl": "fast", "metric": "max_abs_diff", "value": diff})
    if args.json:
        write_results(args.json, "eval", device_name(device), command_line("eval", argv), records,
                      threads=torch.get_num_threads())
    return 0


if __name__ == "__main__":
    sys.exit(main())
