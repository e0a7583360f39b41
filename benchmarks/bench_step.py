"""``python benchmarks/bench_step.py``: the full BLIP pretraining step, reference path against fast path, in one run.

    python benchmarks/bench_step.py                        # ViT-B/16 224 px, batch 96, queue 57,600 (a GPU)
    python benchmarks/bench_step.py --preset tiny --image-size 64 --batch 16 --queue 96 --steps 3   # a CPU smoke run
    python benchmarks/bench_step.py --json benchmarks/results/step-h100-YYYYMMDD.json
    python benchmarks/bench_step.py --impl original --impl reference --impl fast   # with the original (needs blip-ci)

One step is BlipPretrain's forward (ITC + ITM + LM, momentum update, enqueue), backward and AdamW,
exactly as ``blip-fast pretrain`` assembles and runs it (``blip_fast.train.speed``). The impls:

``reference``  the pure-PyTorch reference ops (``BLIP_FAST_IMPL=reference``), fp32 (TF32 matmuls on
               CUDA, like the original's measured run), captions padded to 30 tokens, AdamW one tensor
               at a time, no compile, the text passes one after the other: the original algorithm, written
               plainly;
``fast``       the fast ops (``auto``), bf16 autocast, every transformer block compiled, torch's fused
               AdamW, the captions' real tokens packed without padding (``train.pack_text``,
               blip_fast.models.packing; their count rounded up to 64 as the trainer does for graphs), ITM's
               and LM's text passes layer by layer together (``train.joint_grounded_passes``), and
               on CUDA the whole step replayed as one CUDA graph (``train.cuda_graph``,
               blip_fast.train.cuda_graph);
``fast_no_graph`` (only when asked for) ``fast`` without the CUDA graph: what the graph saves;
``fast_padded`` (only when asked for) ``fast`` with the captions padded to the longest of the batch instead of
               packed: what packing saves;
``fast_separate`` (only when asked for) ``fast`` with ITM's and LM's text passes one after the other instead of
               layer by layer together (``train.joint_grounded_passes``): what the joint passes save;
``original``   (only with ``--impl original``) the original code itself, Salesforce ``BLIP_Pretrain`` from the
               ``blip-ci`` package (``pip install --no-deps blip-ci==0.0.5``; loaded offline with import shims by
               ``benchmarks/original_blip.py``), stepped as the original ``pretrain.py`` does: ``zero_grad``,
               ``model(image, captions, alpha)`` with the captions as strings (tokenized inside the forward),
               the three losses summed, ``backward``, ``torch.optim.AdamW(params=model.parameters(), lr=3e-4,
               weight_decay=0.05)``; fp32 (TF32 on CUDA). Its weights are random (the original starts from
               DeiT/BERT downloads), which changes no timing.

Inputs: images of Gaussian noise (never all zeros) and tokenized captions, chosen by ``--captions``: ``synthetic``
(the default) the built-in scenes' captions, whose lengths follow their one to three objects (9, 17 or 25 tokens);
``full`` every caption at the 30-token cap (three scene captions joined, then truncated), the worst case for packing
and what most web captions (CC12M, LAION) become; or a path to your own captions -- a BLIP annotation list
(``[{"image": ..., "caption": str or [str]}]``) or a text file of one caption per line -- from which each row draws
one caption (seeded), cleaned and truncated as training does: the step on your data's length histogram. The results
file's ``captions`` gives the source and the real tokens per caption. Timing: ``--warmup`` steps, then ``--steps``
steps each bracketed by ``torch.cuda.synchronize()``; the median step gives samples/s; peak memory from
``torch.cuda.max_memory_allocated`` (CUDA only). FLOPs per sample are counted once per impl with
``torch.utils.flop_counter.FlopCounterMode`` on one eager step (forward + backward). MFU = samples/s x FLOPs per
sample / ``--peak-tflops`` (default 798, the H100's measured bf16 peak), twice (docs/results-format.md): *model* MFU
with the original algorithm's FLOPs -- counted on the original code when ``original`` is in the run, else on our
reference path, which counts a little less (it projects the image tokens to cross-attention keys/values once per
step, the original once for each of the 4B text rows; records say which in ``flops_from``) -- and *hardware* MFU
with each impl's own count (the fast path executes less: shared keys/values, captions padded to the longest). The
results file's ``ops`` field names the backend each op took under each impl (blip_fast.ops.registry). ``--variant
NAME:SPEC`` adds impls: the ``fast`` step with other op backends (``variants`` in the file), to weigh one fast op
within the whole step. ``--flops-only`` times nothing: it counts each impl's FLOPs per sample on meta tensors, in
seconds on any machine (a CPU too), with the captions packed as the graphed GPU step packs them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.util
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from blip_fast import ops
from blip_fast.config import preset
from blip_fast.data.synthetic import caption, random_scene
from blip_fast.models.blip_pretrain import BlipPretrain
from blip_fast.models.packing import PackedText
from blip_fast.shapes import PRETRAIN_BATCH, PRETRAIN_IMAGE_SIZE, PRETRAIN_TEXT_LENGTH, QUEUE_SIZE
from blip_fast.text import BlipTokenizer
from blip_fast.text.clean import clean_caption
from blip_fast.train.config import OptimConfig, TrainConfig
from blip_fast.train.distributed import DistributedContext
from blip_fast.train.optim import build_optimizer
from blip_fast.train.pretraining import PACKED_TOKENS_MULTIPLE, PACKED_TOKENS_MULTIPLE_GRAPHED
from blip_fast.train.speed import apply_speed, build_step
from blip_fast.train.step import pretraining_losses

from results_file import command_line, write_results

IMPLS = ("reference", "fast")  # the default; the others run only when asked for
ALL_IMPLS = ("original", "reference", "fast_no_graph", "fast_padded", "fast_separate", "fast")
# --variant NAME:SPEC: ``fast`` (graphed, compiled, bf16) with the op backends of SPEC, e.g.
# ``lm_loss_ref:auto,lm_loss=reference`` -- what one fast op is worth in the whole step
VARIANTS: dict[str, str] = {}
ORIGINAL_LR, ORIGINAL_WEIGHT_DECAY = 3e-4, 0.05  # the original configs/pretrain.yaml: init_lr, weight_decay


def original_blip():
    """``benchmarks/original_blip.py`` (a script beside this one, not part of the package), imported once."""
    name = "blip_fast_benchmarks_original_blip"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("original_blip.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


CAPTION_SOURCES = ("synthetic", "full")


def caption_texts(source: str, count: int, rng: random.Random) -> list[str]:
    """``count`` captions of ``--captions``'s ``source`` (module docstring), cleaned as training cleans them."""
    if source == "synthetic":
        return [caption(random_scene(rng)) for _ in range(count)]
    if source == "full":  # past the cap: the tokenizer truncates every row to 30 tokens
        return [" ".join(caption(random_scene(rng)) for _ in range(3)) for _ in range(count)]
    return [rng.choice(captions_of(source)) for _ in range(count)]


def captions_of(path: str) -> list[str]:
    """Every caption of a BLIP annotation list or of a one-caption-per-line text file, cleaned (``max_words`` 30,
    as ``data.max_words``); SystemExit with one line when there are none."""
    file = Path(path)
    if not file.is_file():
        sys.exit(f"bench_step.py: --captions {path}: neither synthetic, full nor a file")
    text = file.read_text(encoding="utf-8", errors="replace")
    try:
        entries = json.loads(text)
    except json.JSONDecodeError:
        entries = [line for line in text.splitlines() if line.strip()]
    captions = []
    for entry in entries if isinstance(entries, list) else []:
        found = entry.get("caption") if isinstance(entry, dict) else entry
        for one in found if isinstance(found, list) else [found]:
            if isinstance(one, str) and one.strip():
                captions.append(clean_caption(one, max_words=30))
    captions = [c for c in captions if c]
    if not captions:
        sys.exit(f"bench_step.py: --captions {path}: no caption in it (a BLIP annotation list or one per line)")
    return captions


def make_batch(batch: int, image_size: int, device: torch.device, padding: str, seed: int = 0,
               pack_multiple: int | None = None, max_length: int = PRETRAIN_TEXT_LENGTH,
               captions: str = "synthetic"):
    """Images, the captions of ``captions`` (``--captions``) as strings (``texts``, what the original tokenizes
    itself) and tokenized (at most ``max_length`` tokens); with ``pack_multiple``, also the captions' packing (token
    count rounded up to it), as the trainer makes it."""
    rng = random.Random(seed)
    texts = caption_texts(captions, batch, rng)
    tokens = BlipTokenizer()(texts, max_length=max_length, padding=padding)
    images = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    packing = None if pack_multiple is None else PackedText.from_mask(tokens.attention_mask, pack_multiple).to(device)
    return SimpleNamespace(images=images.to(device), texts=texts, input_ids=tokens.input_ids.to(device),
                           attention_mask=tokens.attention_mask.to(device), packing=packing)


def graphed(impl: str, device: torch.device) -> bool:
    return (impl in ("fast", "fast_padded", "fast_separate") or impl in VARIANTS) and device.type == "cuda"


def speed_settings(impl: str, device: torch.device, compile_blocks: bool = False) -> TrainConfig:
    """What ``impl`` applies to the plain model, as ``blip-fast pretrain``'s train section would say it."""
    return TrainConfig(precision="fp32" if impl == "reference" else "bf16", compile=compile_blocks,
                       cuda_graph=graphed(impl, device),
                       joint_grounded_passes=impl not in ("reference", "fast_separate"))


def new_model(impl: str, config) -> BlipPretrain:
    """blip_fast's pretraining model as ``impl`` runs it, without compile (on the CPU, in training mode)."""
    model = BlipPretrain(config).train()
    model.joint_grounded_passes = speed_settings(impl, torch.device("cpu")).joint_grounded_passes
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(impl: str, config, device: torch.device, compile_blocks: bool = False):
    """(model, run_step): ``run_step(batch)`` is one training step of ``impl``, assembled by the trainer's own
    functions (blip_fast.train.speed: the same order of joint passes, compile and CUDA graph)."""
    if impl == "original":
        model = original_blip().build_original_pretrain(config).to(device).train()
        optimizer = torch.optim.AdamW(params=model.parameters(), lr=ORIGINAL_LR, weight_decay=ORIGINAL_WEIGHT_DECAY)
        return model, lambda batch: original_step(model, optimizer, batch, 0.4)
    model = BlipPretrain(config).to(device).train()
    optim = OptimConfig(fused="loop" if impl == "reference" else "auto")
    return model, speed_applied_step(model, speed_settings(impl, device, compile_blocks), optim, device)


def speed_applied_step(model, train: TrainConfig, optim: OptimConfig, device: torch.device,
                       forward=pretraining_losses, alpha: float = 0.4):
    """``run_step(batch)``: one training step of the plain task ``model`` (on ``device``, in training mode) with the
    speed of ``train`` and the optimizer of ``optim``, assembled by the trainer's own functions; ``forward`` is the
    task's (``Trainer.forward``: pretraining's by default, ``RetrievalTrainer.forward`` for retrieval)."""
    parallel = apply_speed(model, train, DistributedContext(device=device))  # one process
    optimizer = build_optimizer(model, optim, device, capturable=train.cuda_graph)
    generator = torch.Generator(device=device).manual_seed(0)
    step = build_step(model, parallel, optimizer, generator, train, optim, forward)  # graphed: a shape's 1st step eager
    return lambda batch: step([batch], alpha)


def original_step(model, optimizer, batch, alpha: float) -> None:
    """One iteration of the original ``pretrain.py`` ``train`` loop (its metric logging left out)."""
    optimizer.zero_grad()
    loss_ita, loss_itm, loss_lm = model(batch.images, batch.texts, alpha=alpha)
    loss = loss_ita + loss_itm + loss_lm
    loss.backward()
    optimizer.step()


def impl_scope(impl: str):
    """blip_fast's op backend for ``impl`` (the original uses none of blip_fast's ops)."""
    if impl == "original":
        return contextlib.nullcontext()
    return ops.impl_scope(VARIANTS.get(impl, "reference" if impl == "reference" else "auto"))


def count_flops(impl: str, config, device, batch) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    _, run_step = build(impl, config, device)
    with impl_scope(impl), FlopCounterMode(display=False) as counter:
        run_step(batch)  # (a graphed impl's first step runs eagerly, so the counter sees it)
    return counter.get_total_flops() / batch.images.shape[0]


def count_flops_on_meta(impl: str, config, batch) -> float:
    """FLOPs per sample of ``impl``'s forward and backward, counted on meta tensors: shapes only, no memory and
    no time, so the ViT-B batch of 96 counts in seconds on any machine. Meta tensors have no backend of their own,
    so every op runs its reference (attention as two matmuls, whose backward counts four: a fused kernel's
    recomputation is not counted). The queue write is left out: it has no FLOPs, and the reference reads the
    queue pointer on the host, which a meta tensor cannot give."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = torch.device("meta")
    model = new_model(impl, config).to(meta)
    model.enqueue = lambda *features: None
    packing = None if batch.packing is None else batch.packing.to(meta)
    with impl_scope(impl), FlopCounterMode(display=False) as counter:
        losses = model(batch.images.to(meta), batch.input_ids.to(meta), batch.attention_mask.to(meta), 0.4,
                       packing=packing)
        sum(losses.values()).backward()
    return counter.get_total_flops() / batch.images.shape[0]


def device_work(events) -> list:
    """The profiler's device events that are work: kernels, copies and memsets. The GPU-side spans of annotations
    are not: our ``blip.*`` record_function regions, and inductor's ``## Call CompiledFxGraph`` around each compiled
    block's kernels (torch 2.11 records those on the GPU; the 2026-11-23 profiles of the ungraphed impls counted them
    as work)."""
    from torch.autograd import DeviceType

    return [e for e in events
            if e.device_type == DeviceType.CUDA and not e.is_user_annotation and not e.name.startswith("blip.")]


def profile_steps(impl: str, run_step, batch, device, steps: int) -> str:
    """A torch.profiler report of ``steps`` warm steps: wall and kernel time per step, kernel launches, the
    step's phases (the ``blip.*`` record_function regions) and the kernels that take the most time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    start = time.perf_counter()
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            run_step(batch)
        _sync(device)
    wall_ms = (time.perf_counter() - start) * 1e3 / steps
    events = prof.events()
    regions: dict[str, list[float]] = {}
    for event in events:
        if event.device_type == DeviceType.CPU and event.name.startswith("blip."):
            cpu_ms, gpu_ms = regions.setdefault(event.name, [0.0, 0.0])
            regions[event.name] = [cpu_ms + event.cpu_time_total / 1e3, gpu_ms + event.device_time_total / 1e3]
    work = device_work(events)
    gpu_ms = sum(e.time_range.elapsed_us() for e in work) / 1e3 / steps
    lines = [f"{impl}: {steps} profiled steps, batch {batch.images.shape[0]}",
             f"wall per step: {wall_ms:.1f} ms (under the profiler); device work per step: {gpu_ms:.1f} ms "
             f"({gpu_ms / wall_ms:.0%} busy); device events per step: {len(work) / steps:.0f}",
             "",
             "phase (record_function)        CPU ms/step   device ms/step   (kernels launched from the main thread:",
             "                                                               backward runs in autograd's own thread)"]
    for name, (cpu_ms, phase_gpu_ms) in sorted(regions.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"{name:<30} {cpu_ms / steps:>11.1f} {phase_gpu_ms / steps:>16.1f}")
    attributed = sum(v[1] for v in regions.values()) / steps
    lines += [f"{'not in a phase (backward)':<30} {'':>11} {gpu_ms - attributed:>16.1f}", ""]
    sort_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    lines.append(prof.key_averages().table(sort_by=sort_key, row_limit=60, max_name_column_width=70))
    # Which op, at which shapes, launched the time: what attributes a kernel of the table above to a line of the
    # model. Empty for a CUDA-graph replay, which launches its kernels without ops: profile fast_no_graph for it.
    lines += ["", "ops by input shape (device time includes the kernels each op launched)"]
    lines.append(prof.key_averages(group_by_input_shape=True).table(
        sort_by="device_time_total" if device.type == "cuda" else "cpu_time_total", row_limit=40,
        max_name_column_width=50, max_shapes_column_width=90))
    return "\n".join(lines)


def measure_steps(run_step, batch, device, steps: int, warmup: int) -> dict:
    """``warmup`` untimed steps, then ``steps`` steps each bracketed by a synchronisation: the median step
    (``step_s``, ``samples_per_s``) and, on CUDA, the peak memory allocated since the call (``peak_gib``: the model
    and its optimizer state included)."""
    if device.type == "cuda":
        gc.collect()  # an earlier impl's model, held by a reference cycle, would count in this one's peak
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for index in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        run_step(batch)
        _sync(device)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    result = {"step_s": statistics.median(times), "samples_per_s": batch.images.shape[0] / statistics.median(times)}
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def time_steps(impl: str, config, device, batch, steps: int, warmup: int, compile_blocks: bool,
               profile_steps_count: int = 0) -> dict:
    model, run_step = build(impl, config, device, compile_blocks)
    with impl_scope(impl):
        result = measure_steps(run_step, batch, device, steps, warmup)
    if profile_steps_count:
        with impl_scope(impl):
            result["profile"] = profile_steps(impl, run_step, batch, device, profile_steps_count)
    del model, run_step
    return result


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The pretraining step's model and batch: ``--preset``, ``--image-size``, ``--batch``, ``--queue``."""
    parser.add_argument("--preset", default="base", choices=("tiny", "base", "large"))
    parser.add_argument("--image-size", type=int, default=PRETRAIN_IMAGE_SIZE)
    parser.add_argument("--batch", type=int, default=PRETRAIN_BATCH)
    parser.add_argument("--queue", type=int, default=QUEUE_SIZE)


def model_config(args: argparse.Namespace):
    """The model :func:`add_model_arguments`'s arguments name."""
    config = preset(args.preset, image_size=args.image_size)
    config.queue_size = args.queue
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/bench_step.py", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile happens here)")
    parser.add_argument("--impl", action="append", choices=ALL_IMPLS,
                        help="only these impls, in this order (default: reference and fast); original: the original "
                             "BLIP code (needs the blip-ci package)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:SPEC",
                        help="also run the fast step with the op backends SPEC (BLIP_FAST_IMPL syntax), reported as "
                             "NAME; e.g. lm_loss_ref:auto,lm_loss=reference")
    parser.add_argument("--no-compile", action="store_true", help="fast path without torch.compile")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, default=798.0,
                        help="bf16 peak for MFU (798: measured on the H100, docs/benchmarks.md)")
    parser.add_argument("--json", help="write the results file here (format: docs/results-format.md)")
    parser.add_argument("--flops-only", action="store_true",
                        help="only count each impl's FLOPs per sample, on meta tensors (seconds, any machine; the "
                             "captions packed as the graphed GPU step packs them)")
    parser.add_argument("--captions", default="synthetic", metavar="SOURCE",
                        help="synthetic (default), full (every caption at the 30-token cap), or a file of your "
                             "captions (BLIP annotation list or one per line): their length histogram")
    parser.add_argument("--profile", metavar="DIR",
                        help="after timing, profile 3 steps of each impl (torch.profiler) into DIR/profile-IMPL.txt")
    args = parser.parse_args(argv)
    if args.batch < 2 or args.steps < 1 or args.warmup < 0:
        parser.error("--batch must be >= 2, --steps >= 1, --warmup >= 0")
    impls = list(dict.fromkeys(args.impl or IMPLS))
    VARIANTS.clear()  # this call's, not an earlier call's in the same process
    for variant in args.variant:
        name, _, spec = variant.partition(":")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in ALL_IMPLS or not spec:
            parser.error(f"--variant {variant!r}: NAME:SPEC with a new NAME of letters, digits, '.', '_', '-'")
        try:
            VARIANTS[name] = ops.registry.validate_impl(spec, f"--variant {name}")
        except ValueError as error:
            parser.error(str(error))
        impls.append(name)
    if args.flops_only and ("original" in impls or args.profile):
        parser.error("--flops-only counts blip_fast's impls only (not original) and profiles nothing")
    if "original" in impls:
        original = original_blip()
        if not original.is_available():
            sys.exit(f"bench_step.py: --impl original needs the original BLIP code: {original.INSTALL_HINT}")
        if args.preset == "tiny":
            parser.error("--impl original: the original has ViT-B/16 and ViT-L/16 only (--preset base or large)")
    device = torch.device(args.device)
    # untimed steps must cover what a fast impl does once: compile its blocks (first step) and, graphed,
    # capture the graph (second step); timed, they put seconds into the median
    timed_fast = [impl for impl in impls if impl.startswith("fast") or impl in VARIANTS]
    if timed_fast and not args.flops_only:
        needed = 2 if any(graphed(impl, device) for impl in timed_fast) else 0 if args.no_compile else 1
        if args.warmup < needed:
            parser.error(f"--warmup {args.warmup}: the fast impls need {needed} untimed steps here (compile"
                         f"{', then capture the CUDA graph' if needed == 2 else ''})")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the original's measured fp32 run used TF32
        torch.backends.cudnn.allow_tf32 = True
    config = model_config(args)
    if args.captions not in CAPTION_SOURCES:
        captions_of(args.captions)  # a bad file is one line now, not after the first impl
    captions_label = args.captions if args.captions in CAPTION_SOURCES else Path(args.captions).stem
    case = f"pretrain_{args.preset}{args.image_size}_b{args.batch}" + (
        "" if args.captions == "synthetic" else f"_captions-{captions_label}")
    records, rows, backends = [], [], {}
    for impl in impls:
        if impl != "original":
            with impl_scope(impl):  # which backend each op takes here: what a later reader needs to compare runs
                backends[impl] = {name: op.select(device) for name, op in ops.OPS.items()}
        fast = impl.startswith("fast") or impl in VARIANTS
        padding = "longest" if fast else "max_length"  # (the original pads its own tokens to 30)
        pack_multiple = None
        if fast and impl != "fast_padded":
            steps_on = torch.device("cuda") if args.flops_only else device
            pack_multiple = PACKED_TOKENS_MULTIPLE_GRAPHED if graphed(impl, steps_on) else PACKED_TOKENS_MULTIPLE
        batch = make_batch(args.batch, args.image_size, device, padding, pack_multiple=pack_multiple,
                           captions=args.captions)
        caption_tokens = float(batch.attention_mask.sum()) / args.batch
        if args.flops_only:
            flops = count_flops_on_meta(impl, copy.deepcopy(config), batch)
            records.append({"case": case, "impl": impl, "metric": "gflop_per_sample", "value": flops / 1e9})
            rows.append((impl, {"gflop_per_sample": flops / 1e9}))
            continue
        flops = count_flops(impl, copy.deepcopy(config), device, batch)
        timing = time_steps(impl, copy.deepcopy(config), device, batch, args.steps, args.warmup,
                            compile_blocks=fast and not args.no_compile,
                            profile_steps_count=3 if args.profile else 0)
        if args.profile:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
            Path(args.profile, f"profile-{impl}.txt").write_text(timing["profile"] + "\n")
        metrics = {"samples_per_s": timing["samples_per_s"], "gflop_per_sample": flops / 1e9,
                   "tflops": timing["samples_per_s"] * flops / 1e12}
        if "peak_gib" in timing:
            metrics["peak_gib"] = timing["peak_gib"]
        records += [{"case": case, "impl": impl, "metric": k, "value": v} for k, v in metrics.items()]
        rows.append((impl, metrics))
    if args.flops_only:
        print(f"{case}: FLOPs per sample of forward + backward, counted on meta tensors, torch {torch.__version__}")
        for impl, metrics in rows:
            print(f"{impl:<13} {metrics['gflop_per_sample']:>8.1f} GFLOP")
        if args.json:
            write_results(args.json, "step", "cpu", command_line("step", argv), records, flops_counted_on="meta",
                          variants=VARIANTS, captions={"source": captions_label, "tokens_per_caption": caption_tokens})
        return 0
    # model FLOPs: the original algorithm's count, from the original code (counted here when it was not timed, so
    # that every run's model MFU uses it), else from our reference path, which shares the image keys/values across
    # ITM and LM and counts ~16% less (the records say which: flops_from)
    counted = dict(rows)
    if "original" not in counted and args.preset != "tiny" and original_blip().is_available():
        padded = make_batch(args.batch, args.image_size, device, "max_length", captions=args.captions)
        counted["original"] = {"gflop_per_sample": count_flops("original", copy.deepcopy(config), device, padded) / 1e9}
    source = next((impl for impl in ("original", "reference") if impl in counted), None)
    for impl, metrics in rows:
        if source is not None:
            model_flops = counted[source]["gflop_per_sample"]
            model_mfu = metrics["samples_per_s"] * model_flops * 1e9 / (args.peak_tflops * 1e12)
            records.append({"case": case, "impl": impl, "metric": "mfu", "value": model_mfu, "flops": "model",
                            "flops_from": source, "gflop_per_sample": model_flops})
            metrics["model_mfu"] = model_mfu
        hardware_mfu = metrics["tflops"] / args.peak_tflops
        records.append({"case": case, "impl": impl, "metric": "mfu", "value": hardware_mfu, "flops": "hardware"})
        metrics["hardware_mfu"] = hardware_mfu

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{case} on {device_name}, torch {torch.__version__}")
    print(f"{'impl':<13} {'samples/s':>10} {'GFLOP/sample':>13} {'peak GiB':>9} {'model MFU':>10} {'hw MFU':>8}")
    for impl, m in rows:
        peak = f"{m['peak_gib']:.1f}" if "peak_gib" in m else "-"
        model_mfu = f"{m['model_mfu']:.1%}" if "model_mfu" in m else "-"
        print(f"{impl:<13} {m['samples_per_s']:>10.1f} {m['gflop_per_sample']:>13.1f} {peak:>9} {model_mfu:>10} "
              f"{m['hardware_mfu']:>8.1%}")
    for impl, chosen in backends.items():
        print(f"ops of {impl}: " + ", ".join(f"{name} {backend}" for name, backend in chosen.items()))
    speed = {impl: m["samples_per_s"] for impl, m in rows}
    for faster, slower in (("fast", "reference"), ("fast", "fast_no_graph"), ("fast", "fast_padded"),
                           ("fast", "fast_separate"),
                           ("reference", "original"),
                           ("fast", "original"), *(("fast", name) for name in VARIANTS)):
        if faster in speed and slower in speed:
            print(f"speed-up {faster} / {slower}: {speed[faster] / speed[slower]:.2f}x")
    if args.json:
        write_results(args.json, "step", device_name, command_line("step", argv), records, ops=backends,
                      variants=VARIANTS, captions={"source": captions_label, "tokens_per_caption": caption_tokens})
    return 0


if __name__ == "__main__":
    sys.exit(main())
