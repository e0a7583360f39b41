"""The benchmark scripts run and write results files in the shared format (tiny shapes; nothing is timed here)."""

import importlib.util
import json
from pathlib import Path

import pytest
from original_checks import needs_original

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
FORMAT_KEYS = {"suite", "device", "torch", "triton", "git", "date", "command", "records"}


def _cpu_results(path, suite, command_start):
    """The results file at ``path``, its shared header checked: every format key, ``suite``, the CPU, and the command
    that made it as one types it in the repository root (a script of this checkout)."""
    data = json.loads(Path(path).read_text())
    assert FORMAT_KEYS <= set(data) and data["suite"] == suite and data["device"] == "cpu"
    assert data["command"].startswith(command_start)
    assert (BENCHMARKS.parent / data["command"].split()[1]).is_file()
    return data


def _script(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}_under_test", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def step_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "step-cpu-test.json"
    code = _script("bench_step").main(["--preset", "tiny", "--image-size", "64", "--batch", "8", "--queue", "96",
                                       "--steps", "1", "--warmup", "0", "--no-compile", "--json", str(out),
                                       "--impl", "reference", "--impl", "fast_padded", "--impl", "fast_separate",
                                       "--impl", "fast",
                                       "--variant", "itc_ref:auto,itc_loss=reference,attention=reference",
                                       "--profile", str(out.parent / "profiles")])
    assert code == 0
    return out


def test_bench_step_profiles_each_impl_by_phase(step_results):
    for impl in ("reference", "fast_separate", "fast"):
        report = (step_results.parent / "profiles" / f"profile-{impl}.txt").read_text()
        assert report.startswith(f"{impl}: 3 profiled steps, batch 8")
        phases = {line.split()[0] for line in report.splitlines() if line.startswith("blip.")}
        # the reference and fast_separate run ITM's and LM's text passes one after the other, fast runs them together
        grounded = {"blip.itm_lm"} if impl == "fast" else {"blip.lm"}
        assert not (phases & ({"blip.lm", "blip.itm_lm"} - grounded))
        assert {"blip.unimodal", "blip.momentum_update", "blip.momentum_forward", "blip.itc", "blip.itm",
                "blip.backward", "blip.optimizer", *grounded} <= phases
        # and the ops with their input shapes, e.g. the text encoder's linear layers at batch 8
        by_shape = report[report.index("ops by input shape"):]
        assert "Input Shapes" in by_shape and "aten::linear" in by_shape and "[8, " in by_shape


def test_bench_step_writes_the_shared_format(step_results):
    data = _cpu_results(step_results, "step",
                        "python benchmarks/bench_step.py --preset tiny --image-size 64 --batch 8 ")
    values = {(r["impl"], r["metric"], r.get("flops")): r["value"] for r in data["records"]}
    for impl in ("reference", "fast"):
        assert values[(impl, "samples_per_s", None)] > 0
        assert values[(impl, "mfu", "hardware")] > 0
    # the fast path does less work for the same result: captions padded to the longest, not to 30, and packed
    assert (values[("fast", "gflop_per_sample", None)] < values[("fast_padded", "gflop_per_sample", None)]
            < values[("reference", "gflop_per_sample", None)])
    assert {r["case"] for r in data["records"]} == {"pretrain_tiny64_b8"}
    # which backend each op took: all reference under the reference impl, the fast ones where they exist
    assert set(data["ops"]["reference"].values()) == {"reference"}
    assert data["ops"]["fast"]["attention"] == "torch"
    # a variant: the fast step with the backends it names, reported under its own name
    assert data["variants"] == {"itc_ref": "auto,itc_loss=reference,attention=reference"}
    assert data["ops"]["itc_ref"]["attention"] == "reference"
    assert data["ops"]["itc_ref"]["momentum_update"] == data["ops"]["fast"]["momentum_update"]
    assert values[("itc_ref", "samples_per_s", None)] > 0


def test_bench_step_counts_flops_on_meta_tensors(step_results, tmp_path):
    out = tmp_path / "step-cpu-flops.json"
    code = _script("bench_step").main(["--preset", "tiny", "--image-size", "64", "--batch", "8", "--queue", "96",
                                       "--flops-only", "--impl", "reference", "--impl", "fast_padded", "--impl", "fast",
                                       "--impl", "fast_separate",
                                       "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert FORMAT_KEYS <= set(data) and data["flops_counted_on"] == "meta"
    flops = {r["impl"]: r["value"] for r in data["records"]}
    assert {r["metric"] for r in data["records"]} == {"gflop_per_sample"}
    # padded to 30, to the longest, packed: less work each time; the joint text passes do the same work as separate
    assert flops["fast"] < flops["fast_padded"] < flops["reference"]
    assert flops["fast_separate"] == flops["fast"]
    # and the reference (the same ops either way) counts what its real step counted
    real = {r["impl"]: r["value"] for r in json.loads(step_results.read_text())["records"]
            if r["metric"] == "gflop_per_sample"}
    assert flops["reference"] == pytest.approx(real["reference"], rel=1e-9)
    with pytest.raises(SystemExit):
        _script("bench_step").main(["--preset", "base", "--flops-only", "--impl", "original"])


def test_bench_step_takes_captions_at_the_cap_or_from_a_file(tmp_path, capsys):
    """``--captions full``: every caption at 30 tokens, so packing saves nothing over padding; a file of captions (a
    BLIP annotation list here) gives its own lengths, cleaned; a file without captions is one line."""
    def flops(captions):
        out = tmp_path / "step.json"
        assert _script("bench_step").main(["--preset", "tiny", "--image-size", "32", "--batch", "6", "--queue", "96",
                                           "--flops-only", "--impl", "reference", "--impl", "fast", "--captions",
                                           captions, "--json", str(out)]) == 0
        data = json.loads(out.read_text())
        return {r["impl"]: r["value"] for r in data["records"]}, data["captions"], data["records"][0]["case"]

    full, described, case = flops("full")
    assert described == {"source": "full", "tokens_per_caption": 30.0} and case.endswith("_captions-full")
    # no padding left to skip (the packed token count is even rounded up to 64, as the graphed step does)
    assert full["fast"] > 0.95 * full["reference"]
    annotations = tmp_path / "mine.json"
    annotations.write_text(json.dumps([{"image": "a.jpg", "caption": ["Two cats.", "a cat on a mat"]},
                                       {"image": "b.jpg", "caption": "Bird!"}, {"image": "c.jpg", "caption": " "}]))
    mine, described, case = flops(str(annotations))
    # [CLS] + words + [SEP]: 4, 6 or 3 tokens a caption, drawn per row
    assert described["source"] == "mine" and 3 <= described["tokens_per_caption"] <= 6 and case.endswith("-mine")
    assert mine["fast"] < mine["reference"]
    annotations.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(SystemExit, match="no caption in it"):
        flops(str(annotations))


def test_bench_step_device_work_leaves_annotation_spans_out():
    """Only kernels, copies and memsets are the GPU's work in the profile report: the GPU-side spans of our phases and
    of inductor's compiled graphs cover kernels already counted."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    def event(name, device_type=DeviceType.CUDA, annotation=False):
        return FunctionEvent(0, name, 0, 0, 10, device_type=device_type, is_user_annotation=annotation)

    kernel, memset = event("nvjet_sm90_gemm"), event("Memset (Device)")
    events = [kernel, memset, event("## Call CompiledFxGraph fabc ##", annotation=True),
              event("blip.itc", annotation=True), event("aten::mm", DeviceType.CPU)]
    assert _script("bench_step").device_work(events) == [kernel, memset]


def test_bench_step_refuses_bad_variants(capsys):
    for variant in ("fast:auto", "bad name:auto", "x:auto,nosuch=reference", "y"):
        with pytest.raises(SystemExit):
            _script("bench_step").main(["--preset", "tiny", "--variant", variant])
        assert "--variant" in capsys.readouterr().err


def test_report_gathers_results_and_names_bad_files(step_results, tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / step_results.name).write_text(step_results.read_text())
    (folder / "broken.json").write_text("{not json")
    (folder / "partial.json").write_text(json.dumps({"suite": "data"}))
    assert _script("report").main(["--results", str(folder)]) == 0
    report = (folder / "REPORT.md").read_text()
    assert "| pretrain_tiny64_b8 | fast | samples_per_s |" in report
    assert "broken.json: not readable JSON" in report and "partial.json: missing device" in report
    assert (folder / "step-cpu-test-samples_per_s.png").stat().st_size > 1000
    assert "![step-cpu-test-samples_per_s.png]" in report
    # model MFU says whose FLOP count it used (here the reference path's: the original is not installed in CI)
    assert "| pretrain_tiny64_b8 | fast | mfu |" in report and "(model, FLOPs of reference)" in report


def test_bench_step_refuses_a_warm_up_shorter_than_compiling(capsys):
    """Compiling blocks takes the first step: timed, it would put seconds into the median."""
    with pytest.raises(SystemExit):
        _script("bench_step").main(["--preset", "tiny", "--impl", "fast", "--warmup", "0"])
    assert "the fast impls need 1 untimed steps" in capsys.readouterr().err


def test_results_files_are_replaced_whole(tmp_path, monkeypatch):
    """A results write that fails part-way leaves the previous file as it was, not a truncated one."""
    import results_file

    path = tmp_path / "step-cpu-test.json"
    results_file.write_results(path, "step", "cpu", "first", [])
    before = path.read_text()

    def fail_midway(self, text, *args, **kwargs):
        Path.write_bytes(self, text[: len(text) // 2].encode())
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", fail_midway)
    with pytest.raises(OSError, match="No space"):
        results_file.write_results(path, "step", "cpu", "second", [{"case": "c", "impl": "i", "metric": "us",
                                                                       "value": 1.0}])
    assert path.read_text() == before and json.loads(before)["command"] == "first"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_bench_pretrain_writes_run_and_retrieval_records(tmp_path):
    out = tmp_path / "eval-cpu-test.json"
    code = _script("bench_pretrain").main([
        "data.synthetic_n=300", f"data.synthetic_dir={tmp_path / 'data'}", "data.batch_size=8", "data.num_workers=0",
        "train.max_steps=4", "train.log_every=1", "train.eval_size=12", "train.eval_itm_k=3",
        "train.tensorboard=false", "--steady-after", "2", "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert FORMAT_KEYS <= set(data) and data["suite"] == "eval" and data["data_backend"] == "pil"
    assert data["command"].startswith("python benchmarks/bench_pretrain.py data.synthetic_n=300 ")
    metrics = {(r["case"], r["metric"]): r["value"] for r in data["records"]}
    assert metrics[("pretrain_tiny-synthetic_4x8", "samples_per_s")] > 0
    assert metrics[("pretrain_tiny-synthetic_4x8", "steady_samples_per_s")] > 0  # steps 3 and 4
    assert metrics[("zero_shot_retrieval_12img_itm3", "chance_r1")] == pytest.approx(100 / 12)
    assert 0 <= metrics[("zero_shot_retrieval_12img_itm3", "img_r10")] <= 100


def test_steady_rate_leaves_out_the_first_windows():
    steady = _script("bench_pretrain").steady_samples_per_s
    windows = [{"step": 10, "elapsed_s": 30.0}, {"kind": "val"}, {"step": 20, "elapsed_s": 32.0},
               {"step": 30, "elapsed_s": 34.0}]
    assert steady(windows, 8, 0) == pytest.approx(30 * 8 / 34.0)
    assert steady(windows, 8, 1) == pytest.approx(20 * 8 / 4.0)     # the compile's 30 s left out
    assert steady(windows, 8, 3) is None


def test_bench_eval_times_both_algorithms_and_they_agree(tmp_path, capsys):
    out = tmp_path / "eval-cpu-test.json"
    code = _script("bench_eval").main(["--preset", "tiny", "--image-size", "32", "--images", "6",
                                       "--captions-per-image", "2", "--k", "3", "--batch-size", "4", "--device", "cpu",
                                       "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert FORMAT_KEYS <= set(data) and data["suite"] == "eval"
    metrics = {(r["impl"], r["metric"]): r["value"] for r in data["records"]}
    assert {r["case"] for r in data["records"]} == {"retrieval_tiny32_6img_12txt_k3"}
    assert metrics[("original", "wall_s")] > 0 and metrics[("fast", "wall_s")] > 0
    assert metrics[("fast", "max_abs_diff")] <= 1e-5  # fp32 on the CPU: the same scores
    assert "fast vs original" in capsys.readouterr().out


@pytest.mark.parametrize("suite", ["lm_loss", "itc_loss", "hard_negatives", "varlen_attention",
                                   "decode_attention", "residual_layer_norm"])
def test_gpu_microbenchmarks_need_a_gpu_and_say_so(capsys, monkeypatch, suite):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without CUDA, here or on a GPU
    assert _script(f"bench_{suite}").main([]) == 1
    assert f"bench_{suite}.py: needs a CUDA device" in capsys.readouterr().err



@needs_original
@pytest.mark.usefixtures("one_intra_op_thread")
def test_bench_finetune_times_the_original_and_ours_from_the_same_weights(tmp_path, capsys):
    """The retrieval fine-tuning step of both impls at the smallest model the original builds (ViT-B/16 at 32 px, the
    tiny text transformer) with the shipped configs' settings; the results file in the shared format."""
    out = tmp_path / "finetune-cpu-test.json"
    code = _script("bench_finetune").main(["--preset", "small", "--image-size", "32", "--batch-size", "4",
                                           "--steps", "1", "--warmup", "0", "--no-compile", "--device", "cpu",
                                           "--json", str(out)])
    assert code == 0
    assert "speed-up fast / original" in capsys.readouterr().out
    data = _cpu_results(out, "finetune", "python benchmarks/bench_finetune.py --preset small --image-size 32 ")
    assert {r["case"] for r in data["records"]} == {"retrieval_small32_b4"}
    values = {(r["impl"], r["metric"]): r["value"] for r in data["records"]}
    assert values[("original", "samples_per_s")] > 0 and values[("fast", "samples_per_s")] > 0
    # ours as the shipped retrieval_coco config trains it (compile left out here), the original as its own config does
    fast, original = data["settings"]["fast"], data["settings"]["original"]
    assert (fast["precision"], fast["activation_checkpointing"], fast["compile"]) == ("bf16", True, False)
    assert (original["vit_ckpt_layer"], original["init_lr"], original["text_padding"]) == (4, 1e-5, 35)
    assert data["ops"]["fast"]["attention"] == "torch" and data["text_tokens"]["padded"] <= 35
    with pytest.raises(SystemExit):  # the original builds ViT-B and ViT-L only
        _script("bench_finetune").main(["--preset", "tiny", "--impl", "original", "--device", "cpu"])


def test_bench_generate_times_both_impls_and_greedy_agrees_in_fp32(tmp_path, capsys):
    """Ours and Hugging Face's BLIP ``generate`` on the same random weights, every strategy, natural and forced length,
    at the smallest size; in fp32 greedy decoding gives the same tokens in both."""
    out = tmp_path / "generate-cpu-test.json"
    code = _script("bench_generate").main(["--preset", "tiny", "--image-size", "32", "--batch-size", "4",
                                           "--max-length", "10", "--min-length", "5", "--repeats", "1",
                                           "--warmup", "0", "--device", "cpu", "--dtype", "fp32", "--json", str(out)])
    assert code == 0
    assert "greedy_forced10_tiny32_b4" in capsys.readouterr().out
    data = _cpu_results(out, "generate", "python benchmarks/bench_generate.py --preset tiny --image-size 32 ")
    values = {(r["case"], r["impl"], r["metric"]): r["value"] for r in data["records"]}
    cases = {f"{strategy}{forced}_tiny32_b4" for strategy in ("greedy", "beam3", "nucleus")
             for forced in ("", "_forced10")}
    assert {r["case"] for r in data["records"]} == cases
    assert {r["metric"] for r in data["records"]} == {"captions_per_s", "tokens_per_s", "agreement"}  # no peak on a CPU
    for case in cases:
        for impl in ("fast", "hf_transformers"):
            assert values[(case, impl, "captions_per_s")] > 0
            if "forced" in case:  # every caption has max_length - 4 prompt tokens = 6 new tokens
                assert data["new_tokens"][case][impl] == 6
                assert values[(case, impl, "tokens_per_s")] == pytest.approx(6 * values[(case, impl, "captions_per_s")])
    assert values[("greedy_tiny32_b4", "fast", "agreement")] == 1.0
    assert values[("greedy_forced10_tiny32_b4", "fast", "agreement")] == 1.0
    assert 0 <= values[("beam3_tiny32_b4", "fast", "agreement")] <= 1
    assert not any(r["metric"] == "agreement" for r in data["records"] if r["case"].startswith("nucleus"))
    # BLIP's settings: nucleus with top-k 50, top-p 0.9 and repetition penalty 1.1, beam search with 3 beams and none
    nucleus, beam = data["settings"]["strategies"]["nucleus"], data["settings"]["strategies"]["beam"]
    assert (nucleus["top_k"], nucleus["top_p"], nucleus["repetition_penalty"]) == (50, 0.9, 1.1)
    assert (beam["num_beams"], beam["repetition_penalty"]) == (3, 1.0)
    with pytest.raises(SystemExit):
        _script("bench_generate").main(["--preset", "tiny", "--batch-size", "4:x"])
    with pytest.raises(SystemExit):  # the compiled impl compiles in its warm-up calls
        _script("bench_generate").main(["--preset", "tiny", "--impl", "fast_compiled", "--warmup", "0"])
    assert "needs --warmup >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # CUDA graphs
        _script("bench_generate").main(["--preset", "tiny", "--impl", "fast_graph", "--device", "cpu"])
    assert "needs --device cuda" in capsys.readouterr().err


def test_bench_generate_agreement_ignores_hf_beam_fill_after_sep():
    """HF's beam search fills after a caption's [SEP] with [SEP], ours with [PAD]; either may stop a step later."""
    import torch

    agreement = _script("bench_generate").agreement
    pad, sep = 0, 102
    ours = torch.tensor([[30522, 7, 8, sep, pad], [30522, 7, 9, 5, 6]])
    hf = torch.tensor([[30522, 7, 8, sep, sep, sep], [30522, 7, 9, 5, 6, sep]])
    assert agreement(ours, hf, 2, sep, pad) == 0.5
    assert agreement(ours[:1, :4], hf[:1], 2, sep, pad) == 1.0


def test_bench_fp8_compares_loss_curves_and_fails_past_its_tolerance(tmp_path, capsys):
    """The FP8 loss-curve check at a toy size on the CPU: windows of both impls recorded, the difference within the
    tolerance; a tolerance of 0 (any difference at all) fails the run with exit code 1."""
    out = tmp_path / "step-cpu-fp8.json"
    argv = ["--preset", "tiny", "--image-size", "32", "--batch", "8", "--queue", "32", "--steps", "8", "--window", "4",
            "--timed", "2", "--batches", "2", "--device", "cpu", "--no-compile", "--json", str(out)]
    assert _script("bench_fp8").main(argv) == 0
    data = json.loads(out.read_text())
    assert FORMAT_KEYS <= set(data) and data["passed"] is True
    values = {(r["impl"], r["metric"], tuple(r.get("steps", ()))): r["value"] for r in data["records"]}
    assert values[("fp8", "max_rel_diff", ())] <= 0.02
    assert {("bf16", "loss_lm", (5, 8)), ("fp8", "loss_lm", (5, 8))} <= set(values)
    assert _script("bench_fp8").main([*argv, "--tolerance", "0"]) == 1
    assert "largest window difference" in capsys.readouterr().out
