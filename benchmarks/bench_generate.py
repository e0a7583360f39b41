"""``python benchmarks/bench_generate.py``: caption generation, ours against Hugging Face transformers' BLIP.

    python benchmarks/bench_generate.py                      # a GPU: ViT-B/16 384 px, batch 64 and 256, bf16
    python benchmarks/bench_generate.py --preset tiny --image-size 64 --batch-size 8 --repeats 3   # a CPU, fp32
    python benchmarks/bench_generate.py --batch-size 64 --batch-size 256:2 \\
        --json benchmarks/results/generate-h100-YYYYMMDD.json     # 2 timed calls at batch 256, --repeats at 64

Captions per second of the captioner's whole ``generate`` call -- the ViT over the batch's images, then the decoding
-- for the three ways BLIP captions, with the settings of the original ``BLIP_Decoder.generate`` (``blip.py``):

``greedy``   one token at a time, the most likely (repetition penalty 1.0);
``beam``     beam search with 3 beams, repetition penalty 1.0 and length penalty 1.0 (``caption_coco.yaml``'s
             evaluation; NoCaps adds a repetition penalty of 1.1, which costs the same);
``nucleus``  sampling from the tokens within top-p 0.9 of the mass after Hugging Face's default top-k 50, which the
             original's ``sample=True`` branch gets without asking for it, with the repetition penalty 1.1 hard-coded
             there.

Every caption starts from the prompt "a picture of " ([DEC] a picture of: 4 tokens); ``--max-length`` and
``--min-length`` count them, as the original's do (defaults 20 and 5: ``caption_coco.yaml``). Each strategy is also
run with a *forced* length, ``min_length = max_length``: [SEP] is forbidden until the last token, so every caption of
both impls has ``max_length - 4`` new tokens whatever the weights, and that case is reported as tokens/s as well; the
early-stopping rules (and how often each impl checks them) then weigh nothing.

Impls, on the same random weights (ours, seeded, written by blip_fast.checkpoint.save_hf and read back by
``transformers``, as tests/models/test_hf_parity.py compares them) and the same images of Gaussian noise:

``fast``             blip_fast's :meth:`BlipCaption.generate` as the tree has it when the script runs (the captions
                     path of ``Blip.caption`` without the image files and the decoding to text);
``hf_transformers``  ``transformers.BlipForConditionalGeneration.generate`` with the same settings, as shipped: its
                     BLIP has one attention implementation (eager) and its default dynamic key/value cache;
``fast_compiled``    ``fast`` on a copy of the model whose ViT blocks and text layers are compiled by
                     blip_fast.models.compile.compile_blocks (inductor), as ``train.compile`` compiles them; the
                     compilation happens in the warm-up calls (at least one is required). Not run unless asked for
                     with ``--impl``;
``fast_graph``       ``fast`` with ``decode_step="cuda_graph"``: after the prompt's step, every one-token step is a
                     CUDA graph, captured once per call (in the timed calls too: it is part of what a call costs)
                     and replayed (GenerationConfig). CUDA only; not run unless asked for;
``fast_decode_kernel``  ``fast`` with the decoding steps' attention in the split-key Triton kernels
                     (``BLIP_FAST_IMPL=auto,decode_attention=triton``; blip_fast.kernels.decode_attention), which
                     ``auto`` leaves out until this impl shows them faster. CUDA only; not run unless asked for.

Both impls hold their weights in ``--dtype`` (bf16 on CUDA, fp32 on the CPU), both on the device. Each case --
strategy, length rule, batch size -- runs ``--warmup`` untimed calls of each impl, then ``--repeats`` timed calls of
each, the impls taking turns call by call (a busy machine then slows both alike), each call bracketed by
``torch.cuda.synchronize()``; the median gives captions/s (and tokens/s). The peak memory of an impl
(``torch.cuda.max_memory_allocated`` over its timed calls, CUDA only) counts its own weights, not the other's.
Nucleus sampling draws from the same seed in every call (ours from a ``torch.Generator``, Hugging Face's from the
global one), so every repeat does the same work.

``agreement`` (greedy and beam, recorded under each of our impls): the fraction of captions whose tokens
are equal in that impl and Hugging Face's (Hugging Face's beam search fills the rest of a caption that ended early
with [SEP], ours with [PAD]: that fill is not compared). Both should give 1.0 in fp32; in bf16 the two round
differently and part ways after a near tie, so it is only recorded.

Random weights seldom make [SEP] the most likely token, and barely tell one image from another: most captions run to
``max_length``, so the natural cases do nearly the work of the forced ones (``new tokens`` in the table and the file's
``new_tokens`` say how many each impl generated per caption). With a trained captioner the natural cases end earlier,
though a batch runs until its longest caption ends. Results file: docs/results-format.md, suite ``generate``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from typing import NamedTuple

import torch

from blip_fast import ops
from blip_fast.checkpoint import save_hf
from blip_fast.config import PRESETS, preset
from blip_fast.models import BlipCaption, GenerationConfig
from blip_fast.models.compile import compile_blocks
from blip_fast.shapes import FINETUNE_IMAGE_SIZE
from blip_fast.text import BlipTokenizer

from results_file import command_line, device_name, write_results

IMPLS = ("fast", "hf_transformers", "fast_compiled", "fast_graph", "fast_decode_kernel")
# the impls that run our model under a backend choice of their own
IMPL_BACKENDS = {"fast_decode_kernel": "auto,decode_attention=triton"}
DEFAULT_IMPLS = ("fast", "hf_transformers")
STRATEGIES = ("greedy", "beam", "nucleus")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NUM_BEAMS = 3
TOP_P, TOP_K = 0.9, 50
REPETITION_PENALTY = {"greedy": 1.0, "beam": 1.0, "nucleus": 1.1}  # the original generate's (module docstring)
DEFAULT_BATCHES = ("64", "256")


class Case(NamedTuple):
    strategy: str
    batch: int
    forced: bool
    """min_length = max_length: every caption has the same number of new tokens."""
    repeats: int

    def name(self, model: str, max_length: int) -> str:
        label = f"beam{NUM_BEAMS}" if self.strategy == "beam" else self.strategy
        return f"{label}{f'_forced{max_length}' if self.forced else ''}_{model}_b{self.batch}"


def generation_config(strategy: str, max_length: int, min_length: int) -> GenerationConfig:
    """BLIP's settings for ``strategy`` (module docstring), as ours takes them."""
    return GenerationConfig(strategy=strategy, max_length=max_length, min_length=min_length,
                            num_beams=NUM_BEAMS if strategy == "beam" else 1,
                            top_k=TOP_K, top_p=TOP_P, repetition_penalty=REPETITION_PENALTY[strategy],
                            length_penalty=1.0)


def hf_generate_kwargs(config: GenerationConfig) -> dict:
    """The same settings as arguments of Hugging Face's ``generate``."""
    kwargs = {"max_length": config.max_length, "min_length": config.min_length,
              "repetition_penalty": config.repetition_penalty}
    if config.strategy == "nucleus":
        return {**kwargs, "do_sample": True, "num_beams": 1, "top_p": config.top_p, "top_k": config.top_k}
    if config.strategy == "beam":
        return {**kwargs, "do_sample": False, "num_beams": config.num_beams, "length_penalty": config.length_penalty,
                "early_stopping": False}
    return {**kwargs, "do_sample": False, "num_beams": 1}


def models(preset_name: str, image_size: int, dtype: torch.dtype):
    """Ours (seeded random weights) and Hugging Face's BLIP loaded from ours written by ``save_hf``; both in eval
    mode, in ``dtype``, on the CPU."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    ours = BlipCaption(preset(preset_name, image_size=image_size)).eval()
    with tempfile.TemporaryDirectory() as directory:
        save_hf(ours, directory)
        hf = transformers.BlipForConditionalGeneration.from_pretrained(directory).eval()
    return ours.to(dtype), hf.to(dtype)


def generate_call(impl: str, model, prompt_ids: torch.Tensor, config: GenerationConfig, sep: int, seed: int):
    """A function of the images that runs ``impl``'s whole ``generate`` and returns its token ids (B, L)."""
    if impl != "hf_transformers":
        def call(images):
            generator = torch.Generator(images.device).manual_seed(seed) if config.strategy == "nucleus" else None
            with ops.impl_scope(IMPL_BACKENDS.get(impl, "auto")):
                return model.generate(images, prompt_ids, config, generator)
        return call
    # HF's BLIP takes the tokenized prompt with its [SEP], drops that and writes [DEC] over [CLS] (in place)
    hf_prompt = torch.cat([prompt_ids, torch.full_like(prompt_ids[:, :1], sep)], dim=1)
    kwargs = hf_generate_kwargs(config)

    def call(images):
        torch.manual_seed(seed)  # HF samples from the global generators (CPU and CUDA)
        return model.generate(pixel_values=images, input_ids=hf_prompt.clone(), **kwargs)
    return call


def measure(calls: dict, images: torch.Tensor, warmup: int, repeats: int, resident: dict[str, int]) -> dict:
    """Each impl's median seconds over ``repeats`` timed calls, after ``warmup`` untimed ones; the impls take turns
    call by call, so that a change in the machine's load falls on all of them alike. With the peak memory of each
    impl's timed calls (CUDA) less the bytes of the other impls' weights (``resident``: bytes per impl, all on the
    device), and each impl's last tokens."""
    cuda = images.device.type == "cuda"
    for call in calls.values():
        for _ in range(warmup):
            call(images)
    seconds = {impl: [] for impl in calls}
    results = {impl: {} for impl in calls}
    for _ in range(repeats):
        for impl, call in calls.items():
            if cuda:
                torch.cuda.synchronize()  # the work queued before must not land in this call's time
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            tokens = call(images)
            if cuda:
                torch.cuda.synchronize()  # the call has only queued the device's last steps
            seconds[impl].append(time.perf_counter() - started)
            results[impl]["tokens"] = tokens.cpu()
            if cuda:
                others = sum(size for other, size in resident.items() if other != impl)
                peak = (torch.cuda.max_memory_allocated() - others) / 2**30
                results[impl]["peak_gib"] = max(results[impl].get("peak_gib", 0.0), peak)
    for impl in calls:
        results[impl]["seconds"] = statistics.median(seconds[impl])
    return results


def on_device(model: torch.nn.Module, device: torch.device) -> int:
    """Move ``model`` to ``device``; the bytes that took there (0 off CUDA)."""
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    model.to(device)
    return torch.cuda.memory_allocated(device) - before if device.type == "cuda" else 0


def comparable(tokens: torch.Tensor, prompt_length: int, width: int, sep: int, pad: int) -> torch.Tensor:
    """Token ids with [PAD] after each caption's first generated [SEP] (HF's beam search fills with [SEP]) and
    [PAD] out to ``width`` columns (an impl may stop a few steps after the last caption ended)."""
    generated = tokens[:, prompt_length:]
    is_sep = (generated == sep).long()
    after_end = is_sep.cumsum(dim=1) - is_sep > 0
    tokens = torch.cat([tokens[:, :prompt_length], generated.masked_fill(after_end, pad)], dim=1)
    return torch.nn.functional.pad(tokens, (0, width - tokens.shape[1]), value=pad)


def agreement(ours: torch.Tensor, theirs: torch.Tensor, prompt_length: int, sep: int, pad: int) -> float:
    """The fraction of captions (rows) with equal tokens."""
    if ours.shape[0] != theirs.shape[0]:
        raise ValueError(f"{ours.shape[0]} captions against {theirs.shape[0]}")
    width = max(ours.shape[1], theirs.shape[1])
    same = (comparable(ours, prompt_length, width, sep, pad) == comparable(theirs, prompt_length, width, sep, pad))
    return float(same.all(dim=1).float().mean())


def generated_tokens(tokens: torch.Tensor, prompt_length: int, sep: int, pad: int) -> float:
    """Mean new tokens per caption, its [SEP] included."""
    return float(comparable(tokens, prompt_length, tokens.shape[1], sep, pad)[:, prompt_length:].ne(pad)
                 .sum(dim=1).float().mean())


def batch_sizes(values: list[str], repeats: int, parser: argparse.ArgumentParser) -> list[tuple[int, int]]:
    """``SIZE`` or ``SIZE:REPEATS`` values as (size, repeats)."""
    sizes = []
    for value in values:
        size, _, own = value.partition(":")
        try:
            pair = (int(size), int(own) if own else repeats)
        except ValueError:
            parser.error(f"--batch-size takes SIZE or SIZE:REPEATS; got {value!r}")
        if pair[0] < 1 or pair[1] < 1:
            parser.error(f"--batch-size {value}: the size and the repeats must be at least 1")
        sizes.append(pair)
    return sizes


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/bench_generate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="base", choices=tuple(PRESETS), help="model size (base: ViT-B/16)")
    parser.add_argument("--image-size", type=int, default=FINETUNE_IMAGE_SIZE, help="pixels (384: 577 image tokens)")
    parser.add_argument("--batch-size", action="append", metavar="SIZE[:REPEATS]",
                        help="images per call, repeatable (default: 64 and 256); SIZE:REPEATS times that size with "
                             "its own number of timed calls")
    parser.add_argument("--strategy", action="append", choices=STRATEGIES, help="only these (default: all three)")
    parser.add_argument("--impl", action="append", choices=IMPLS,
                        help="only these (default: fast and hf_transformers)")
    parser.add_argument("--max-length", type=int, default=20, help="longest caption in tokens, the prompt's 4 included")
    parser.add_argument("--min-length", type=int, default=5, help="shortest caption in tokens, the prompt's included")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case and impl (the median is kept)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per case and impl before the timed ones")
    parser.add_argument("--seed", type=int, default=0, help="of the nucleus sampling and the images")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where both impls run (default: cuda when there is one)")
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                        help="of both models and the images (auto: bf16 on CUDA, fp32 elsewhere)")
    parser.add_argument("--json", metavar="PATH", help="write the results file (format: docs/results-format.md) here")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats >= 1 and --warmup >= 0")
    if not 0 <= args.min_length <= args.max_length:
        parser.error("0 <= --min-length <= --max-length")
    args.batches = batch_sizes(args.batch_size or list(DEFAULT_BATCHES), args.repeats, parser)
    args.strategies = list(dict.fromkeys(args.strategy or STRATEGIES))
    args.impls = list(dict.fromkeys(args.impl or DEFAULT_IMPLS))
    if "fast_compiled" in args.impls and args.warmup < 1:
        parser.error("--impl fast_compiled needs --warmup >= 1: the compilation happens in the warm-up calls")
    if "fast_graph" in args.impls and torch.device(args.device).type != "cuda":
        parser.error("--impl fast_graph needs --device cuda: it replays CUDA graphs")
    if "fast_decode_kernel" in args.impls and torch.device(args.device).type != "cuda":
        parser.error("--impl fast_decode_kernel needs --device cuda: elsewhere the registry would fall back to SDPA")
    if args.dtype == "auto":
        args.dtype = "bf16" if torch.device(args.device).type == "cuda" else "fp32"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    ours, hf = models(args.preset, args.image_size, dtype)
    text = ours.config.text
    prompt_ids = ours.prompt_ids(BlipTokenizer(), generation_config("greedy", args.max_length, 0))  # (1, P)
    prompt_length = prompt_ids.shape[1]
    model_name = f"{args.preset}{args.image_size}"
    cases = [Case(strategy, batch, forced, repeats) for batch, repeats in args.batches
             for strategy in args.strategies for forced in (False, True)]
    images = {batch: torch.randn(batch, 3, args.image_size, args.image_size,
                                 generator=torch.Generator().manual_seed(args.seed + batch)).to(dtype)
              for batch, _ in args.batches}
    by_impl = {"fast": ours, "hf_transformers": hf, "fast_graph": ours, "fast_decode_kernel": ours}
    if "fast_compiled" in args.impls:
        by_impl["fast_compiled"] = copy.deepcopy(ours)
        compile_blocks(by_impl["fast_compiled"])
    resident = {impl: on_device(by_impl[impl], device) for impl in args.impls}
    for same_model in ("fast_graph", "fast_decode_kernel"):
        if same_model in resident and "fast" in resident:  # the same model: its bytes are fast's
            resident[same_model] = resident["fast"]
    results = {}  # (case, impl) -> measure()'s result
    for case in cases:
        config = generation_config(case.strategy, args.max_length, args.max_length if case.forced else args.min_length)
        prompts = prompt_ids.repeat(case.batch, 1).to(device)
        calls = {impl: generate_call(impl, by_impl[impl], prompts,
                                     replace(config, decode_step="cuda_graph") if impl == "fast_graph" else config,
                                     text.sep_token_id, args.seed)
                 for impl in args.impls}
        measured = measure(calls, images[case.batch].to(device), args.warmup, case.repeats, resident)
        print(case.name(model_name, args.max_length) + ": "
              + ", ".join(f"{impl} {result['seconds']:.3f} s" for impl, result in measured.items()), flush=True)
        results.update({(case, impl): result for impl, result in measured.items()})

    records, lengths = [], {}
    for case in cases:
        name = case.name(model_name, args.max_length)
        for impl in args.impls:
            result = results[case, impl]
            captions = case.batch / result["seconds"]
            records.append({"case": name, "impl": impl, "metric": "captions_per_s", "value": captions})
            new_tokens = generated_tokens(result["tokens"], prompt_length, text.sep_token_id, text.pad_token_id)
            lengths.setdefault(name, {})[impl] = new_tokens
            if case.forced:
                records.append({"case": name, "impl": impl, "metric": "tokens_per_s", "value": captions * new_tokens})
            if "peak_gib" in result:
                records.append({"case": name, "impl": impl, "metric": "peak_gib", "value": result["peak_gib"]})
        for impl in ("fast", "fast_compiled", "fast_graph", "fast_decode_kernel"):
            if case.strategy != "nucleus" and {impl, "hf_transformers"} <= set(args.impls):
                same = agreement(results[case, impl]["tokens"], results[case, "hf_transformers"]["tokens"],
                                 prompt_length, text.sep_token_id, text.pad_token_id)
                records.append({"case": name, "impl": impl, "metric": "agreement", "value": same})

    device_label = device_name(device)
    print(f"\n{model_name}, {args.dtype} on {device_label}, torch {torch.__version__}; captions of at most "
          f"{args.max_length} tokens ({prompt_length} of them the prompt), at least {args.min_length} unless forced")
    print(f"{'case':<34} {'impl':<16} {'captions/s':>10} {'tokens/s':>10} {'new tokens':>10} {'peak GiB':>8} "
          f"{'agree':>6} {'vs HF':>6}")
    value = {(r["case"], r["impl"], r["metric"]): r["value"] for r in records}
    for case in cases:
        name = case.name(model_name, args.max_length)
        for impl in args.impls:
            captions = value[name, impl, "captions_per_s"]
            tokens = value.get((name, impl, "tokens_per_s"))
            peak = value.get((name, impl, "peak_gib"))
            agree = value.get((name, impl, "agreement"))
            hf_speed = value.get((name, "hf_transformers", "captions_per_s"))
            ratio = f"{captions / hf_speed:.2f}x" if impl != "hf_transformers" and hf_speed else ""
            print(f"{name:<34} {impl:<16} {captions:>10.1f} {'' if tokens is None else f'{tokens:.0f}':>10} "
                  f"{lengths[name][impl]:>10.1f} {'' if peak is None else f'{peak:.2f}':>8} "
                  f"{'' if agree is None else f'{agree:.3f}':>6} {ratio:>6}")
    if args.json:
        settings = {"prompt": ours.config.prompt, "prompt_tokens": prompt_length, "max_length": args.max_length,
                    "min_length": args.min_length, "dtype": args.dtype, "warmup": args.warmup,
                    "repeats": {str(batch): repeats for batch, repeats in args.batches},
                    "seed": args.seed, "strategies": {s: {k: v for k, v in asdict(generation_config(s, 1, 0)).items()
                                                          if k not in ("max_length", "min_length")}
                                                      for s in args.strategies}}
        write_results(args.json, "generate", device_label, command_line("generate", argv), records, settings=settings,
                      new_tokens=lengths, threads=torch.get_num_threads())
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
