"""``python benchmarks/bench_capfilt.py``: BLIP's CapFilt claim at small scale, on the CPU, end to end.

    python benchmarks/bench_capfilt.py --work runs/capfilt-claim          # about 40 minutes on 2 CPU cores
    python benchmarks/bench_capfilt.py --work runs/capfilt-claim --json benchmarks/results/capfilt-cpu-YYYYMMDD.json

The paper (section 3.3, table 1) pretrains on noisy web pairs, fine-tunes a captioner and a filter from that model on
clean human-written pairs (COCO), bootstraps the web set with them, and shows that pretraining again on the
bootstrapped set gives a better model. Here the same steps run on the built-in scenes, each through the command a
user runs (``blip-fast data synth``, ``pretrain``, ``finetune retrieval``, ``finetune caption``, ``capfilt``), with
the tiny model of ``blip-fast pretrain``'s default:

1. the web set: ``data synth --noise 0.3`` (``--n`` scenes, 90% train), 30% of its training captions replaced by
   another scene's, recorded in ``noise.json``; its test split (clean, one caption per image) is the zero-shot
   retrieval benchmark of step 5. The COCO stand-in: ``data synth --task retrieval --seed 1`` (other scenes, five
   differently worded true captions per image);
2. the tiny model pretrained on the web set (the default recipe: ``--pretrain-steps`` steps of 32, learning rate
   1e-3 after 50 warm-up steps, decayed 0.9 per half of the run);
3. from it, the filter (``finetune retrieval``: ITC + ITM) and the captioner (``finetune caption``: LM) on the COCO
   stand-in, ``--finetune-epochs`` epochs each (learning rate 5e-4 and 1e-3, cosine);
4. ``capfilt`` on the web set's training shards: one nucleus caption per image, web and synthetic captions kept when
   the ITM match probability is above ``--threshold``;
5. for each of ``--seeds``, the tiny model pretrained from random weights by the same recipe and the same number of
   steps (a smaller set is passed over more often) on three sets: ``noisy`` (the web set), ``bootstrapped``
   (CapFilt's output) and ``clean`` (the web set's images with their true captions: the ceiling no real web set
   offers), then evaluated zero-shot on the test split.

What is measured (records of the results file, suite ``capfilt``; docs/results-format.md):

(a) the filter against the planted noise, over the web captions: ``precision`` (share of the removed captions that
    were planted), ``recall`` (share of the planted ones removed) and ``removed_fraction`` at the threshold, impl
    ``capfilt``; a filter removing as many captions at random has, in expectation, precision = the planted share and
    recall = the removed share (impl ``random_filter``). ``auc``: the chance that a true caption's ITM probability is
    above a planted one's (0.5 for a random score). Case ``filter_at_noise_rate``: the same with the threshold set
    to remove as many captions as were planted, to show the ranking apart from the calibration of the 0.5 cut;
(b) the synthetic captions against the drawn scenes (``blip_fast.data.synthetic.objects_named``): ``precision``
    (share of the named objects whose colour and shape are in the scene), ``recall`` (share of the scene's objects
    named with their colour and shape), ``exact_precision`` (size, colour, shape and place all right); impl
    ``captioner`` against ``chance``: the same captions scored against the scene of another image, a random
    permutation, averaged over 10;
(c) zero-shot retrieval (``txt_r1`` ... ``img_r10``, ``r_mean``) per arm and seed (cases ``pretrain_seedS``), and in
    case ``pretrain_mean`` their means over seeds.

Every stage writes into ``--work`` and is skipped when its output is complete, so an interrupted run continues where
it stopped; a stage's command and output go to ``--work/logs/STAGE.log``. Rerun on the same machine, a pretraining
stage repeated its losses and recalls exactly (docs/capfilt.md); other machines and torch versions round otherwise.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from blip_fast.data.shards import ShardFailure, read_shard
from blip_fast.data.synthetic import SceneObject, objects_named

from results_file import command_line, write_results

RECALLS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")
ARMS = ("noisy", "bootstrapped", "clean")
CHANCE_DRAWS = 10
BATCH = 32  # pairs per step of the tiny recipe (the pretrain_tiny_synthetic config)


class StageFailed(RuntimeError):
    pass


def run_stage(work: Path, name: str, args: list[str], done: Path) -> None:
    """Run ``blip-fast ARGS`` in ``work`` unless ``done`` exists; its output goes to ``logs/NAME.log``."""
    if done.exists():
        print(f"[{name}] done before: {done.relative_to(work)}")
        return
    log = work / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "blip_fast.cli", *args]
    start = time.perf_counter()
    with log.open("w") as out:
        out.write(" ".join(command) + "\n")
        out.flush()
        status = subprocess.run(command, cwd=work, stdout=out, stderr=subprocess.STDOUT).returncode
    if status != 0 or not done.exists():
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise StageFailed(f"stage {name} failed (exit {status}); the end of {log}:\n{tail}")
    print(f"[{name}] {time.perf_counter() - start:.0f} s")


def pretrain_args(out: str, shards: str, steps: int, seed: int, eval_size: int) -> list[str]:
    """``blip-fast pretrain`` on tar shards by the default tiny recipe, ``steps`` steps whatever the set's size. An
    epoch is a pass over the set (``steps // 2`` is the engine's first estimate, corrected after the first pass), so
    a smaller set decays its learning rate and ramps its alpha over fewer steps, as the recipe does on any set."""
    return ["pretrain", f"data.paths=[{json.dumps(shards)}]", "data.kind=shards",
            f"data.steps_per_epoch={max(1, steps // 2)}", "data.image_root=web", "data.eval_path=web/test.json",
            "train.epochs=1000", f"train.max_steps={steps}", f"train.seed={seed}", f"train.out={out}",
            f"train.eval_size={eval_size}", "train.tensorboard=false", f"train.checkpoint_every={steps}"]


def finetune_args(task: str, out: str, init: str, epochs: int, lr: float) -> list[str]:
    args = ["finetune", task, "--config", "tiny-synthetic", "data.kind=json", "data.paths=[coco/train.json]",
            "data.image_root=coco", "data.eval_path=coco/test.json", f"train.init_from={init}",
            "optim.schedule=cosine", "optim.warmup_steps=0", f"optim.init_lr={lr}", "optim.min_lr=0",
            f"train.epochs={epochs}", f"train.out={out}", "train.tensorboard=false", "train.log_every=100"]
    if task == "retrieval":
        args.append("train.alpha_ramp_epochs=1")
    if task == "caption":
        args.append("train.eval_java=false")
    return args


def checkpoint_of(work: Path, run: str) -> str:
    return json.loads((work / run / "summary.json").read_text())["checkpoint"]


def shard_scenes(shards: list[Path]) -> dict[str, list[SceneObject]]:
    """Each sample's drawn scene, from the ``.json`` members ``data synth`` writes into its shards."""
    scenes = {}
    for path in shards:
        for record in read_shard(str(path)):
            if isinstance(record, ShardFailure):
                raise ValueError(f"cannot read the scenes of {path}: {record.detail}")
            meta = json.loads(record.files["json"])
            scenes[meta["key"]] = [SceneObject(**obj) for obj in meta["scene"]]
    return scenes


def auc(positives: list[float], negatives: list[float]) -> float:
    """P(a positive's score > a negative's), ties counted half (the Mann-Whitney statistic)."""
    ranked = sorted([(s, 1) for s in positives] + [(s, 0) for s in negatives])
    rank_sum, i = 0.0, 0
    while i < len(ranked):
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        mean_rank = (i + 1 + j) / 2  # ranks i+1 .. j share their mean
        rank_sum += mean_rank * sum(label for _, label in ranked[i:j])
        i = j
    n_pos, n_neg = len(positives), len(negatives)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def filter_records(web: list[dict], planted: set[str]) -> list[dict]:
    """(a): the filter's removal of the web captions against the planted ones, at its threshold and at the noise
    rate, with the random filter's expected precision and recall beside each."""
    scores = [(r["itm_prob"], r["key"] in planted) for r in web]
    n_planted = sum(is_planted for _, is_planted in scores)
    if not web or not n_planted or n_planted == len(web):
        raise ValueError("the filter measurement needs web captions both planted and true")
    removed_at_threshold = [is_planted for r, (_, is_planted) in zip(web, scores, strict=True) if not r["kept"]]
    # the noise-rate cut: the n_planted lowest probabilities removed
    lowest = sorted(scores, key=lambda score: score[0])[:n_planted]
    records = []
    for case, removed in (("filter_at_threshold", removed_at_threshold),
                          ("filter_at_noise_rate", [is_planted for _, is_planted in lowest])):
        hits = sum(removed)
        share = len(removed) / len(web)
        records += [
            {"case": case, "impl": "capfilt", "metric": "precision", "value": hits / len(removed) if removed else 0.0},
            {"case": case, "impl": "capfilt", "metric": "recall", "value": hits / n_planted},
            {"case": case, "impl": "capfilt", "metric": "removed_fraction", "value": share},
            {"case": case, "impl": "random_filter", "metric": "precision", "value": n_planted / len(web)},
            {"case": case, "impl": "random_filter", "metric": "recall", "value": share},
        ]
    true_scores = [s for s, is_planted in scores if not is_planted]
    planted_scores = [s for s, is_planted in scores if is_planted]
    ranking = auc(true_scores, planted_scores)
    records += [{"case": "filter_ranking", "impl": "capfilt", "metric": "auc", "value": ranking},
                {"case": "filter_ranking", "impl": "random_filter", "metric": "auc", "value": 0.5}]
    return records


def caption_scores(pairs: list[tuple[str, list[SceneObject]]]) -> dict[str, float]:
    named = [objects_named(text, scene) for text, scene in pairs]
    said, present = sum(n.named for n in named), sum(n.present for n in named)
    return {"precision": sum(n.colour_shape for n in named) / max(said, 1),
            "recall": sum(n.colour_shape for n in named) / max(present, 1),
            "exact_precision": sum(n.exact for n in named) / max(said, 1)}


def caption_records(synthetic: list[dict], scenes: dict[str, list[SceneObject]], seed: int = 0) -> list[dict]:
    """(b): the synthetic captions against their images' scenes, and against other images' scenes (chance)."""
    if not synthetic:
        raise ValueError("no synthetic captions to measure")
    keys = [r["key"] for r in synthetic]
    ours = caption_scores([(r["caption"], scenes[r["key"]]) for r in synthetic])
    rng = random.Random(seed)
    draws = []
    for _ in range(CHANCE_DRAWS):
        other = rng.sample(keys, len(keys))
        draws.append(caption_scores([(r["caption"], scenes[k]) for r, k in zip(synthetic, other, strict=True)]))
    chance = {metric: statistics.fmean(d[metric] for d in draws) for metric in ours}
    kept = [r for r in synthetic if r["kept"]]
    records = [{"case": "synthetic_captions", "impl": "captioner", "metric": m, "value": v} for m, v in ours.items()]
    records += [{"case": "synthetic_captions", "impl": "chance", "metric": m, "value": v} for m, v in chance.items()]
    if kept:
        records += [{"case": "synthetic_captions_kept", "impl": "captioner", "metric": m, "value": v}
                    for m, v in caption_scores([(r["caption"], scenes[r["key"]]) for r in kept]).items()]
    return records


def capfilt_pairs(out: Path) -> list[dict]:
    pairs = []
    for path in sorted((out / "units").glob("[0-9][0-9][0-9][0-9][0-9].json")):
        pairs += json.loads(path.read_text())
    return pairs


def zero_shot(work: Path, run: str) -> dict[str, float]:
    evaluation = [json.loads(line) for line in (work / run / "metrics.jsonl").read_text().splitlines()]
    evaluation = [record for record in evaluation if record.get("kind") == "eval"][-1]
    return {metric: evaluation[metric] for metric in RECALLS}


def run(args: argparse.Namespace) -> list[dict]:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    size = str(args.image_size)
    run_stage(work, "synth_web", ["data", "synth", "--out", "web", "--n", str(args.n), "--noise", str(args.noise),
                                  "--image-size", size], work / "web" / "info.json")
    run_stage(work, "synth_clean", ["data", "synth", "--out", "clean", "--n", str(args.n), "--image-size", size],
              work / "clean" / "info.json")
    run_stage(work, "synth_coco", ["data", "synth", "--task", "retrieval", "--out", "coco", "--n", str(args.coco_n),
                                   "--seed", "1", "--image-size", size], work / "coco" / "info.json")
    eval_size = json.loads((work / "web" / "info.json").read_text())["splits"]["test"]["samples"]
    if eval_size < 2:
        raise ValueError(f"--n {args.n} leaves {eval_size} test image(s); the evaluation needs at least 2")
    web_shards = "web/shards/train-*.tar"
    run_stage(work, "pretrain_web", pretrain_args("pretrain_web", web_shards, args.pretrain_steps, 0, eval_size),
              work / "pretrain_web" / "summary.json")
    start = checkpoint_of(work, "pretrain_web")
    run_stage(work, "filter", finetune_args("retrieval", "filter", start, args.finetune_epochs, 5e-4),
              work / "filter" / "summary.json")
    run_stage(work, "captioner", finetune_args("caption", "captioner", start, args.finetune_epochs, 1e-3),
              work / "captioner" / "summary.json")
    run_stage(work, "capfilt", ["capfilt", "--captioner", checkpoint_of(work, "captioner"), "--filter",
                                checkpoint_of(work, "filter"), "--data", web_shards, "--out", "capfilt",
                                "--threshold", str(args.threshold), "--device", "cpu", "--batch-size", "64"],
              work / "capfilt" / "report.json")

    pairs = capfilt_pairs(work / "capfilt")
    planted = set(json.loads((work / "web" / "noise.json").read_text())["samples"])
    scenes = shard_scenes(sorted((work / "web" / "shards").glob("train-*.tar")))
    records = filter_records([p for p in pairs if p["source"] == "web"], planted)
    records += caption_records([p for p in pairs if p["source"] == "synthetic"], scenes)
    report = json.loads((work / "capfilt" / "report.json").read_text())
    records.append({"case": "bootstrapped_set", "impl": "capfilt", "metric": "pairs", "value": report["pairs"]["kept"]})
    if report["pairs"]["kept"] < BATCH:
        raise ValueError(f"the filter kept {report['pairs']['kept']} pairs, fewer than one batch of {BATCH}: nothing "
                         f"to pretrain the bootstrapped arm on (a lower --threshold keeps more)")

    shards = {"noisy": web_shards, "bootstrapped": "capfilt/shards/*.tar", "clean": "clean/shards/train-*.tar"}
    results: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    for seed in args.seeds:
        for arm in ARMS:
            name = f"{arm}_seed{seed}"
            run_stage(work, name, pretrain_args(name, shards[arm], args.pretrain_steps, seed, eval_size),
                      work / name / "summary.json")
            recalls = zero_shot(work, name)
            results[arm].append(recalls)
            records += [{"case": f"pretrain_seed{seed}", "impl": arm, "metric": m, "value": v}
                        for m, v in recalls.items()]
    for arm in ARMS:
        records += [{"case": "pretrain_mean", "impl": arm, "metric": m,
                     "value": statistics.fmean(r[m] for r in results[arm])} for m in RECALLS]
    return records


def table(records: list[dict], seeds: list[int]) -> str:
    def value(case, impl, metric):
        found = [r["value"] for r in records if (r["case"], r["impl"], r["metric"]) == (case, impl, metric)]
        return found[0] if found else float("nan")

    lines = ["(a) the filter on the web captions (planted noise recovered)",
             f"{'case':22} {'impl':14} {'precision':>9} {'recall':>7} {'removed':>8}"]
    for case in ("filter_at_threshold", "filter_at_noise_rate"):
        for impl in ("capfilt", "random_filter"):
            removed = value(case, "capfilt", "removed_fraction")
            lines.append(f"{case:22} {impl:14} {value(case, impl, 'precision'):9.3f} {value(case, impl, 'recall'):7.3f}"
                         f" {removed:8.3f}")
    ranking = value("filter_ranking", "capfilt", "auc")
    lines.append(f"AUC of the ITM probability, true over planted captions: {ranking:.3f}")
    lines += ["", "(b) synthetic captions against the drawn scenes (colour and shape of each named object)",
              f"{'case':24} {'impl':10} {'precision':>9} {'recall':>7} {'exact':>6}"]
    for case, impl in (("synthetic_captions", "captioner"), ("synthetic_captions", "chance"),
                       ("synthetic_captions_kept", "captioner")):
        lines.append(f"{case:24} {impl:10} {value(case, impl, 'precision'):9.3f} {value(case, impl, 'recall'):7.3f}"
                     f" {value(case, impl, 'exact_precision'):6.3f}")
    lines += ["", "(c) zero-shot retrieval after pretraining from scratch (R@1 / R@5 each way, r_mean)",
              f"{'case':16} {'arm':13} {'txt_r1':>6} {'txt_r5':>6} {'img_r1':>6} {'img_r5':>6} {'r_mean':>6}"]
    for case in [f"pretrain_seed{s}" for s in seeds] + ["pretrain_mean"]:
        for arm in ARMS:
            lines.append(f"{case:16} {arm:13} " + " ".join(f"{value(case, arm, m):6.2f}"
                                                          for m in ("txt_r1", "txt_r5", "img_r1", "img_r5", "r_mean")))
    return "\n".join(lines)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip("`"))
    parser.add_argument("--work", default="runs/capfilt-claim", help="folder of every stage's output (resumable)")
    parser.add_argument("--n", type=int, default=8000, help="scenes of the web set (90%% train, 5%% test)")
    parser.add_argument("--noise", type=float, default=0.3, help="share of the web training captions replaced")
    parser.add_argument("--coco-n", type=int, default=1000, help="images of the clean fine-tuning set (80%% train)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--pretrain-steps", type=int, default=450, help="steps of 32 pairs of every pretraining")
    parser.add_argument("--finetune-epochs", type=int, default=10, help="epochs of the filter's and captioner's")
    parser.add_argument("--threshold", type=float, default=0.5, help="the filter's ITM probability threshold")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44], help="seeds of the pretraining arms")
    parser.add_argument("--json", help="write the results file here (docs/results-format.md)")
    args = parser.parse_args(argv)
    for name in ("n", "coco_n", "pretrain_steps", "finetune_epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < args.noise < 1:
        parser.error("--noise must be strictly between 0 and 1: the filter is measured against planted captions")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    try:
        records = run(args)
    except (StageFailed, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(table(records, args.seeds))
    if args.json:
        path = write_results(args.json, "capfilt", "cpu", command_line("capfilt", argv), records,
                             settings={k: v for k, v in vars(args).items() if k != "json"})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
