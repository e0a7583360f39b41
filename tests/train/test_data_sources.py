"""The engine on the data a user brings: BLIP JSON lists with an evaluation list, tar shards, DALI transforms."""

import json

import pytest
from train_helpers import tiny_overrides

from blip_fast.data.dali_pipeline import HAS_DALI
from blip_fast.train.config import load_pretrain_config
from blip_fast.train.pretraining import pretrain


def _run(overrides, tmp_path):
    lines = []
    summary = pretrain(load_pretrain_config(None, overrides), printer=lines.append)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return summary, records, lines


def test_json_lists_with_an_evaluation_list(synthetic_dir, tmp_path):
    base = [o for o in tiny_overrides(synthetic_dir, tmp_path) if not o.startswith(("data.synthetic", "train.eval"))]
    summary, records, _ = _run([*base, "data.kind=json", f"data.paths=[{synthetic_dir / 'train.json'}]",
                                f"data.image_root={synthetic_dir}", f"data.eval_path={synthetic_dir / 'val.json'}",
                                "train.eval_size=20", "train.eval_itm_k=0", "train.max_steps=3"], tmp_path)
    assert summary.steps == 3 and summary.evaluation["images"] == 20 and summary.evaluation["itm_k"] == 0
    assert records[-1]["kind"] == "eval"


def test_tar_shards_need_and_use_steps_per_epoch(synthetic_dir, tmp_path):
    base = [o for o in tiny_overrides(synthetic_dir, tmp_path) if not o.startswith("data.synthetic")]
    shards = f"data.paths=[\"{synthetic_dir / 'shards' / 'train-{00000..00005}.tar'}\"]"
    from blip_fast.config import ConfigError

    with pytest.raises(ConfigError, match="data.steps_per_epoch"):
        _run([*base, "data.kind=shards", shards, "train.max_steps=2"], tmp_path)
    summary, records, lines = _run([*base, "data.kind=shards", shards, "data.steps_per_epoch=5",
                                    "train.max_steps=4"], tmp_path)
    assert summary.steps == 4 and "(5 per epoch)" in lines[0]
    assert [r["step"] for r in records] == [2, 4]
    # steps_per_epoch counts batches per rank; with 2 micro-batches per optimizer step an epoch is 5 // 2 = 2 steps,
    # so the alpha ramp (over 2 epochs) reaches alpha * 3/4 at the last step of the second epoch
    summary, records, lines = _run([*base, "data.kind=shards", shards, "data.steps_per_epoch=5",
                                    "optim.grad_accum_steps=2", "train.max_steps=4", "train.log_every=1",
                                    "train.eval_size=0"], tmp_path)
    assert summary.steps == 4 and "(2 per epoch)" in lines[0]
    assert [r["alpha"] for r in records[-4:]] == pytest.approx([0.0, 0.1, 0.2, 0.3])  # (the file holds both runs)


def test_tar_shards_with_an_evaluation_list_under_image_root(synthetic_dir, tmp_path):
    # shards hold their images; data.image_root then serves the evaluation list (relative paths), and alone it is
    # refused rather than silently unused
    base = [o for o in tiny_overrides(synthetic_dir, tmp_path) if not o.startswith(("data.synthetic", "train.eval"))]
    shards = f"data.paths=[\"{synthetic_dir / 'shards' / 'train-{00000..00005}.tar'}\"]"
    from blip_fast.config import ConfigError

    with pytest.raises(ConfigError, match="data.image_root applies to JSON lists"):
        _run([*base, "data.kind=shards", shards, "data.steps_per_epoch=5", f"data.image_root={synthetic_dir}",
              "train.max_steps=2"], tmp_path)
    summary, _, _ = _run([*base, "data.kind=shards", shards, "data.steps_per_epoch=5",
                          f"data.image_root={synthetic_dir}", f"data.eval_path={synthetic_dir / 'val.json'}",
                          "train.eval_size=10", "train.eval_itm_k=0", "train.max_steps=2"], tmp_path)
    assert summary.steps == 2 and summary.evaluation["images"] == 10


@pytest.mark.skipif(not HAS_DALI, reason="NVIDIA DALI is not installed")
def test_dali_cpu_pretraining_transform(synthetic_dir, tmp_path):
    # DALI on the CPU with the original pretraining transform (crops, flips, RandomAugment) feeding the engine
    overrides = [*tiny_overrides(synthetic_dir, tmp_path), "data.backend=dali", "data.transform.kind=pretrain",
                 "train.max_steps=2"]
    summary, _, lines = _run(overrides, tmp_path)
    assert summary.steps == 2 and "images via dali_cpu" in lines[0]
