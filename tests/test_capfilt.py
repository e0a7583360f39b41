"""CapFilt (``blip_fast.capfilt``, ``blip-fast capfilt``) on tiny random-weight checkpoints and on the noisy
synthetic set of ``blip-fast data synth --noise 0.3``.

What is checked: the filter's scores against each pair's ITM probability and ITC similarity computed one pair at a
time through the public API (fp32; the filter stacks an image's texts against its keys/values, which changes only
the order of sums: 1e-5); the synthetic captions against the API's own nucleus sampling under the same seed; the
threshold, provenance and the report's counts against the written pairs; a run that crashes after two units, then
reruns, against an uninterrupted run, byte for byte; two gloo ranks against one process, byte for byte; bad inputs
as one ``error:`` line.
"""

import json
import os
import re
import socket

import pytest
import torch

import blip_fast
from blip_fast.capfilt import CAPFILT_GENERATION, CapfiltConfig, filter_pairs, run_capfilt, synthetic_captions
from blip_fast.capfilt import run as capfilt_run
from blip_fast.checkpoint import save_salesforce
from blip_fast.cli import main
from blip_fast.config import tiny_config
from blip_fast.data.sample import DataStats
from blip_fast.data.shards import TarShards
from blip_fast.data.synth import write_synthetic_dataset
from blip_fast.models import GenerationConfig, build_model
from blip_fast.text import BlipTokenizer

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

# short captions keep the runs quick (random weights rarely end a caption before max_length)
FAST = ["--max-length", "12", "--min-length", "6"]
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("capfilt")
    torch.manual_seed(0)
    paths = {}
    for task in ("caption", "retrieval", "pretrain"):
        paths[task] = root / f"{task}.pth"
        save_salesforce(build_model(task, tiny_config()), paths[task])
    # 30 scenes: 26 training images, 8 of whose captions belong to another scene; 4 training shards (8, 8, 8, 2)
    paths["data"] = root / "data"
    write_synthetic_dataset(paths["data"], 30, noise=0.3, image_size=64, shard_size=8)
    paths["shards"] = str(paths["data"] / "shards" / "train-{00000..00003}.tar")
    return paths


def _pixels(count: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _args(setup, out, data="json", *extra):
    source = ["--data", str(setup["data"] / "train.json"), "--image-root", str(setup["data"])] if data == "json" \
        else ["--data", setup["shards"]]
    return ["capfilt", "--captioner", str(setup["caption"]), "--filter", str(setup["retrieval"]), *source,
            "--out", str(out), "--captions-per-image", "2", "--batch-size", "5", "--device", "cpu", *FAST, *extra]


def _files(out) -> dict[str, bytes]:
    """Every file under ``out`` but the report, which also records the run's timing."""
    return {os.path.relpath(os.path.join(folder, name), out): open(os.path.join(folder, name), "rb").read()
            for folder, _, names in os.walk(out) for name in names if name != "report.json"}


def _report(out) -> dict:
    report = json.loads((out / "report.json").read_text())
    report.pop("run")
    return report


@pytest.mark.parametrize("task", ["retrieval", "pretrain"])
def test_filter_scores_equal_the_itm_and_itc_of_each_pair_alone(setup, task):
    blip = blip_fast.load(setup[task], device="cpu")
    pixels = _pixels(5)
    words = ["a big red circle on the left", "two blue squares", "a small yellow triangle at the top",
             "a dog", "A Green Circle!", "a white square in the middle and a purple circle"]
    uniform = [[words[(i + j) % 6] for j in range(3)] for i in range(5)]            # 3 texts each: stacked blocks
    ragged = [words[:1], words[1:4], [], words[4:6], words[2:3]]                     # 1, 3, 0, 2, 1 texts
    for texts in (uniform, ragged):
        for batch_size in (2, 5):
            itm, itc = filter_pairs(blip.model, pixels, texts, batch_size=batch_size)
            pairs = [(i, text) for i, row in enumerate(texts) for text in row]
            assert itm.shape == itc.shape == (len(pairs),)
            expected_itm = torch.cat([blip.match(pixels[i:i + 1], [text]) for i, text in pairs])
            expected_itc = torch.stack([blip.similarity(pixels[i:i + 1], [text])[0, 0] for i, text in pairs])
            torch.testing.assert_close(itm, expected_itm, **TOLERANCE)
            torch.testing.assert_close(itc, expected_itc, **TOLERANCE)


def test_filter_refuses_a_captioner_a_text_without_words_and_mismatched_lists(setup):
    retrieval = blip_fast.load(setup["retrieval"], device="cpu").model
    caption = blip_fast.load(setup["caption"], device="cpu").model
    with pytest.raises(ValueError, match="retrieval or pretrain model; got a caption model"):
        filter_pairs(caption, _pixels(1), [["a dog"]])
    with pytest.raises(ValueError, match=r"text 1 of image 1 \('\.\.\.'\) is empty after cleaning"):
        filter_pairs(retrieval, _pixels(2), [["a dog"], ["a cat", "..."]])
    with pytest.raises(ValueError, match="2 images but 1 lists of texts"):
        filter_pairs(retrieval, _pixels(2), [["a dog"]])


def test_synthetic_captions_are_the_apis_nucleus_samples_under_the_same_seed(setup):
    blip = blip_fast.load(setup["caption"], device="cpu")
    pixels = _pixels(3)
    generation = GenerationConfig(**{**CAPFILT_GENERATION.__dict__, "max_length": 12, "min_length": 6})
    sampled = synthetic_captions(blip.model, pixels, 2, BlipTokenizer(), generation, torch.Generator().manual_seed(7))
    assert [len(row) for row in sampled] == [2, 2, 2]
    # the API's nucleus sampling (top-k 50, top-p 0.9, repetition penalty 1.1) of each image twice, seeded alike
    expected = blip.caption(pixels.repeat_interleave(2, dim=0), strategy="nucleus", max_length=12, min_length=6,
                            seed=7)
    assert [text for row in sampled for text in row] == expected
    again = synthetic_captions(blip.model, pixels, 2, BlipTokenizer(), generation, torch.Generator().manual_seed(7))
    assert again == sampled
    # the original BLIP_Decoder.generate(sample=True)'s settings
    assert (CAPFILT_GENERATION.strategy, CAPFILT_GENERATION.top_p, CAPFILT_GENERATION.top_k,
            CAPFILT_GENERATION.repetition_penalty, CAPFILT_GENERATION.max_length,
            CAPFILT_GENERATION.min_length) == ("nucleus", 0.9, 50, 1.1, 30, 10)


@pytest.fixture(scope="module")
def json_run(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("json-run") / "out"
    assert main(_args(setup, out, "json", "--unit-size", "10", "--threshold", "0")) == 0
    return out


def _unit_records(out) -> list[dict]:
    return [record for path in sorted((out / "units").glob("?????.json"))
            for record in json.loads(path.read_text())]


def test_json_run_scores_every_web_and_synthetic_pair_with_provenance(setup, json_run):
    train = json.loads((setup["data"] / "train.json").read_text())
    records = _unit_records(json_run)
    assert sorted(p.name for p in (json_run / "units").iterdir()) == [
        f"{u:05d}{suffix}" for u in range(3) for suffix in (".done.json", ".json")]     # 26 entries, units of 10
    web = [r for r in records if r["source"] == "web"]
    synthetic = [r for r in records if r["source"] == "synthetic"]
    assert [(r["image"], r["image_id"], r["caption"]) for r in web] == [
        (e["image"], e["image_id"], e["caption"]) for e in train]
    report = json.loads((json_run / "report.json").read_text())
    assert report["synthetic"]["generated"] == 2 * len(train)
    assert len(synthetic) == report["synthetic"]["scored"] == 2 * len(train) - report["synthetic"]["empty"]
    # threshold 0 keeps every scored pair; the JSON list and the shards hold them all, in order
    assert report["pairs"] == {"scored": len(records), "kept": len(records), "kept_fraction": 1.0}
    kept = json.loads((json_run / "bootstrapped.json").read_text())
    assert kept == [{k: v for k, v in r.items() if k != "kept"} for r in records]
    shards = TarShards(str(json_run / "shards"))
    samples = [shards.sample(record, DataStats()) for shard in shards.shards for record in shards.read(shard)]
    assert [(s.caption, s.extra["meta"]["source"], s.extra["meta"]["itm_prob"]) for s in samples] == [
        (r["caption"], r["source"], r["itm_prob"]) for r in kept]
    assert samples[0].image_bytes == (setup["data"] / train[0]["image"]).read_bytes()
    # the scores written are the filter's on the images as the evaluation transform reads them
    blip = blip_fast.load(setup["retrieval"], device="cpu")
    first = [r for r in records if r["image"] == train[0]["image"]]
    itm, itc = filter_pairs(blip.model, blip._images([str(setup["data"] / train[0]["image"])]),
                            [[r["caption"] for r in first]])
    # (one image alone, not in a batch of five: the ViT's sums may differ in the last bits)
    torch.testing.assert_close(torch.tensor([r["itm_prob"] for r in first]), itm, **TOLERANCE)
    torch.testing.assert_close(torch.tensor([r["itc_sim"] for r in first]), itc, **TOLERANCE)


def test_threshold_keeps_the_pairs_above_it_and_the_report_counts_them(setup, json_run, tmp_path, capsys):
    records = _unit_records(json_run)
    threshold = float(_median_probability(json_run))
    out = tmp_path / "out"
    assert main(_args(setup, out, "json", "--unit-size", "10", "--threshold", repr(threshold))) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    rerun = _unit_records(out)
    # the same captions and scores as the run at threshold 0: only the decisions differ
    assert [{k: v for k, v in r.items() if k != "kept"} for r in rerun] == [
        {k: v for k, v in r.items() if k != "kept"} for r in records]
    assert [r["kept"] for r in rerun] == [r["itm_prob"] > threshold for r in records]
    kept = json.loads((out / "bootstrapped.json").read_text())
    assert kept == [{k: v for k, v in r.items() if k != "kept"} for r in rerun if r["kept"]]
    assert 0 < len(kept) < len(rerun)
    report = json.loads((out / "report.json").read_text())
    for source in ("web", "synthetic"):
        scored = [r for r in rerun if r["source"] == source]
        assert report[source]["scored"] == len(scored)
        assert report[source]["kept"] == sum(r["kept"] for r in scored)
        assert report[source]["kept_fraction"] == pytest.approx(report[source]["kept"] / len(scored), abs=1e-6)
    assert report["pairs"]["kept"] == len(kept)
    assert report["images"]["with_kept_pair"] == len({r["image"] for r in kept})
    assert report["settings"]["threshold"] == threshold
    assert len(printed) == 1 and printed[0].startswith(f"capfilt: 26 images (0 skipped): kept pairs {len(kept)} of ")


def _median_probability(run) -> str:
    """A threshold that keeps about half of a run's pairs (the random filter's ITM probabilities all lie close to
    0.19, so 0.5 would keep none and leave nothing to compare)."""
    probabilities = sorted(r["itm_prob"] for r in _unit_records(run))
    return repr(probabilities[len(probabilities) // 2])


@pytest.fixture(scope="module")
def shard_run(setup, json_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("shard-run") / "out"
    assert main(_args(setup, out, "shards", "--threshold", _median_probability(json_run))) == 0
    report = json.loads((out / "report.json").read_text())
    assert 0 < report["web"]["kept"] < report["web"]["scored"]
    assert 0 < report["synthetic"]["kept"] < report["synthetic"]["scored"]
    return out


def test_compiled_models_write_what_eager_ones_write(setup, json_run, tmp_path, monkeypatch):
    # --compile compiles both models' blocks; aot_eager here (dynamo's graphs and guards without inductor's code
    # generation, tests/models/test_compile.py), fp32: the same captions, kept pairs and scores to 1e-5
    from compile_checks import compile_with_aot_eager

    compiled = compile_with_aot_eager(monkeypatch, capfilt_run)
    torch._dynamo.reset()
    out = tmp_path / "compiled"
    assert main(_args(setup, out, "json", "--unit-size", "10", "--threshold", "0", "--compile")) == 0
    torch._dynamo.reset()
    assert compiled == ["caption", "retrieval"]
    assert json.loads((out / "capfilt.json").read_text())["compile"] is True
    assert json.loads((json_run / "capfilt.json").read_text())["compile"] is False
    eager, ours = _unit_records(json_run), _unit_records(out)
    assert [(r["caption"], r["source"], r["kept"]) for r in ours] == [(r["caption"], r["source"], r["kept"])
                                                                     for r in eager]
    for name in ("itm_prob", "itc_sim"):
        torch.testing.assert_close(torch.tensor([r[name] for r in ours]), torch.tensor([r[name] for r in eager]),
                                   **TOLERANCE)


def test_shard_run_writes_the_images_its_json_list_points_to(setup, shard_run):
    kept = json.loads((shard_run / "bootstrapped.json").read_text())
    records = _unit_records(shard_run)
    assert kept == [{k: v for k, v in r.items() if k != "kept"} for r in records if r["kept"]]
    assert sum(r["source"] == "web" for r in records) == 26
    for entry in kept:
        assert (shard_run / entry["image"]).is_file()
        assert entry["shard"].endswith(".tar") and re.fullmatch(rf"images/\d{{5}}/{entry['key']}\.jpg", entry["image"])
    # the noisy ground truth of data synth travels with each web pair, in its shard sample's .json
    shards = TarShards(str(shard_run / "shards"))
    metas = [shards.sample(r, DataStats()).extra["meta"] for s in shards.shards for r in shards.read(s)]
    assert len(metas) == len(kept)
    assert all("noisy" in m["meta"] for m in metas)


def test_a_crashed_run_resumes_to_the_bytes_of_an_uninterrupted_one(setup, shard_run, tmp_path, monkeypatch):
    out = tmp_path / "out"
    threshold = json.loads((shard_run / "capfilt.json").read_text())["threshold"]
    config = CapfiltConfig(captioner=str(setup["caption"]), filter=str(setup["retrieval"]), data=[setup["shards"]],
                           out=str(out), captions_per_image=2, batch_size=5, device="cpu", max_length=12,
                           min_length=6, threshold=threshold, progress=False)
    finished = []
    run_unit = capfilt_run._Capfilt.run_unit

    def crash_after_two(self, unit, progress):
        if len(finished) == 2:
            raise RuntimeError("planted crash")
        finished.append(unit.index)
        return run_unit(self, unit, progress)

    monkeypatch.setattr(capfilt_run._Capfilt, "run_unit", crash_after_two)
    with pytest.raises(RuntimeError, match="planted crash"):
        run_capfilt(config)
    monkeypatch.setattr(capfilt_run._Capfilt, "run_unit", run_unit)
    assert sorted(p.name for p in (out / "units").glob("*.done.json")) == ["00000.done.json", "00001.done.json"]
    assert not list(out.rglob("*.tmp"))
    # what a kill -9 inside unit 2 would leave: a half-written shard under its temporary name, the unit's records
    # without its done marker
    (out / "shards" / ".00002.tar.tmp").write_bytes(b"half a tar")
    (out / "units" / "00002.json").write_text("[\n{\"caption\": \"half")
    report = run_capfilt(config)
    assert report["run"]["units_done_before"] == 2
    assert _files(out) == _files(shard_run)
    assert _report(out) == _report(shard_run)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    assert main(args) == 0


def test_two_gloo_ranks_write_what_one_process_writes(setup, shard_run, tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "out"
    threshold = repr(json.loads((shard_run / "capfilt.json").read_text())["threshold"])
    mp.spawn(_rank_main, args=(free_port(), _args(setup, out, "shards", "--threshold", threshold)), nprocs=2,
             join=True)
    assert _files(out) == _files(shard_run)
    assert _report(out) == _report(shard_run)
    assert json.loads((out / "report.json").read_text())["run"]["ranks"] == 2


def test_mistakes_are_one_line_errors(setup, json_run, tmp_path, capsys):
    data = setup["data"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    caption, retrieval, new = str(setup["caption"]), str(setup["retrieval"]), str(tmp_path / "o")
    models = ["--captioner", caption, "--filter", retrieval, "--device", "cpu"]
    train = ["--data", str(data / "train.json"), "--image-root", str(data)]
    cases = [
        (["--captioner", retrieval, "--filter", retrieval, *train, "--out", new],
         "--captioner .* holds a retrieval model; it must be a caption checkpoint"),
        (["--captioner", caption, "--filter", caption, *train, "--out", new],
         "--filter .* holds a caption model; it must be a retrieval or pretrain checkpoint"),
        (["--captioner", str(tmp_path / "none.pth"), "--filter", retrieval, *train, "--out", new],
         "--captioner: checkpoint not found"),
        ([*models, "--data", str(data / "missing.json"), "--out", new], "annotation file not found"),
        ([*models, "--data", str(data / "shards" / "train-00009.tar"), "--out", new], "shard not found"),
        ([*models, "--data", str(data / "train.json"), str(data / "shards" / "train-00000.tar"), "--out", new],
         "JSON lists or tar shards, not both"),
        ([*models, "--data", setup["shards"], "--image-root", str(data), "--out", new],
         "--image-root applies to a JSON list"),
        ([*models, *train, "--out", new, "--threshold", "1.5"], r"--threshold must be in \[0, 1\)"),
        ([*models, *train, "--out", new, "--captions-per-image", "0"],
         "--captions-per-image must be an integer of at least 1"),
        ([*models, *train, "--out", new, "--max-length", "4", "--min-length", "2"],
         r"max_length \(4\) counts the prompt"),
        ([*models, *train, "--out", str(a_file)], "exists and is not a directory"),
        ([*models, *train, "--out", str(foreign)], "is not empty and holds no capfilt run"),
        ([*models, *train, "--out", new, "--device", "cuda:0" if not torch.cuda.is_available() else "tpu"],
         "--device"),
        # the folder of a finished run with other settings: never mixed with them
        (_args(setup, json_run, "json", "--unit-size", "10", "--threshold", "0", "--seed", "3")[1:],
         r"holds a capfilt run with other settings \(seed\)"),
    ]
    for argv, message in cases:
        assert main(["capfilt", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1, err
        assert re.search(message, err), (message, err)
    assert not (tmp_path / "o").exists() and [p.name for p in foreign.iterdir()] == ["notes.txt"]
