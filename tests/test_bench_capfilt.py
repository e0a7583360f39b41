"""``benchmarks/bench_capfilt.py``, the CapFilt experiment: its measurements on records whose answers are known, and
the whole pipeline at a toy size (every stage through the CLI, then a rerun that resumes with nothing to do)."""

import importlib.util
import json
import random
from itertools import product
from pathlib import Path

import pytest

from blip_fast.data.synthetic import SceneObject, caption, random_scene

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_capfilt_under_test", BENCHMARKS / "bench_capfilt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def value(records, case, impl, metric):
    [found] = [r["value"] for r in records if (r["case"], r["impl"], r["metric"]) == (case, impl, metric)]
    return found


def test_auc_equals_counting_every_pair(bench):
    rng = random.Random(0)
    for _ in range(20):
        positives = [rng.choice([0.1, 0.5, 0.9, rng.random()]) for _ in range(rng.randint(1, 12))]
        negatives = [rng.choice([0.1, 0.5, rng.random()]) for _ in range(rng.randint(1, 12))]
        counted = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in product(positives, negatives))
        assert bench.auc(positives, negatives) == pytest.approx(counted / (len(positives) * len(negatives)))


def test_filter_records_count_removed_planted_captions(bench):
    # 10 web captions, 4 planted (keys p*); the filter keeps 5, removing 3 planted and 2 true ones
    planted = {"p0", "p1", "p2", "p3"}
    web = [{"key": k, "itm_prob": prob, "kept": prob > 0.5} for k, prob in
           [("p0", 0.1), ("p1", 0.2), ("p2", 0.3), ("p3", 0.9), ("t0", 0.4), ("t1", 0.45), ("t2", 0.6),
            ("t3", 0.7), ("t4", 0.8), ("t5", 0.95)]]
    records = bench.filter_records(web, planted)
    assert value(records, "filter_at_threshold", "capfilt", "precision") == pytest.approx(3 / 5)
    assert value(records, "filter_at_threshold", "capfilt", "recall") == pytest.approx(3 / 4)
    assert value(records, "filter_at_threshold", "capfilt", "removed_fraction") == pytest.approx(5 / 10)
    assert value(records, "filter_at_threshold", "random_filter", "precision") == pytest.approx(4 / 10)
    assert value(records, "filter_at_threshold", "random_filter", "recall") == pytest.approx(5 / 10)
    # at the noise rate the 4 lowest are removed: p0, p1, p2 and t0
    assert value(records, "filter_at_noise_rate", "capfilt", "precision") == pytest.approx(3 / 4)
    assert value(records, "filter_at_noise_rate", "capfilt", "recall") == pytest.approx(3 / 4)
    # true above planted in 21 of the 24 pairs (p3 at 0.9 is above t0..t4 but below t5)
    assert value(records, "filter_ranking", "capfilt", "auc") == pytest.approx((6 * 4 - 5) / 24)
    with pytest.raises(ValueError, match="planted and true"):
        bench.filter_records(web, set())


def test_caption_records_score_true_captions_perfectly_and_chance_below(bench):
    rng = random.Random(1)
    scenes = {f"{i:03d}": random_scene(rng) for i in range(200)}
    synthetic = [{"key": key, "caption": caption(scene), "kept": i % 2 == 0}
                 for i, (key, scene) in enumerate(scenes.items())]
    records = bench.caption_records(synthetic, scenes)
    for metric in ("precision", "recall", "exact_precision"):
        assert value(records, "synthetic_captions", "captioner", metric) == 1.0
        assert value(records, "synthetic_captions_kept", "captioner", metric) == 1.0
    # 6 colours x 3 shapes: another scene's object shares colour and shape about 1 time in 18 per object drawn
    assert 0.02 < value(records, "synthetic_captions", "chance", "precision") < 0.25
    assert value(records, "synthetic_captions", "chance", "exact_precision") < 0.05
    wrong = [{**r, "caption": "a small red circle in the middle"} for r in synthetic]
    no_red_circles = {k: [SceneObject("blue", "square", "big", "at the top")] for k in scenes}
    assert value(bench.caption_records(wrong, no_red_circles), "synthetic_captions", "captioner", "precision") == 0.0


def test_the_pipeline_at_a_toy_size_then_resumed(bench, tmp_path, capsys):
    # every stage through the CLI at a toy size: the numbers mean nothing here, the plumbing does (threshold 0: the
    # toy filter keeps every pair, so the bootstrapped arm has data)
    work, out = tmp_path / "work", tmp_path / "capfilt-cpu.json"
    argv = ["--work", str(work), "--n", "200", "--coco-n", "40", "--image-size", "32", "--pretrain-steps", "2",
            "--finetune-epochs", "1", "--seeds", "7", "--threshold", "0", "--json", str(out)]
    assert bench.main(argv) == 0, capsys.readouterr()
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results["suite"] == "capfilt" and results["settings"]["seeds"] == [7]
    records = results["records"]
    for arm in bench.ARMS:
        recalls = {m: value(records, "pretrain_seed7", arm, m) for m in bench.RECALLS}
        assert recalls == {m: value(records, "pretrain_mean", arm, m) for m in bench.RECALLS}
        assert 0 <= recalls["txt_r1"] <= 100
    # the filter's counts agree with capfilt's own report
    report = json.loads((work / "capfilt" / "report.json").read_text())
    assert value(records, "filter_at_threshold", "capfilt", "removed_fraction") == pytest.approx(
        1 - report["web"]["kept"] / report["web"]["scored"])
    assert value(records, "bootstrapped_set", "capfilt", "pairs") == report["pairs"]["kept"]
    assert "(c) zero-shot retrieval" in printed
    # a rerun finds every stage done and measures the same
    assert bench.main(argv) == 0
    rerun = capsys.readouterr().out
    assert "[capfilt] done before" in rerun and "[clean_seed7] done before" in rerun
    assert json.loads(out.read_text())["records"] == records


def test_a_set_without_a_test_split_is_one_error_line(bench, tmp_path, capsys):
    assert bench.main(["--work", str(tmp_path), "--n", "3", "--seeds", "1"]) == 1
    assert "error: --n 3 leaves 0 test image(s)" in capsys.readouterr().err
