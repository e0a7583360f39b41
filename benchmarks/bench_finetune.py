"""``python benchmarks/bench_finetune.py``: the retrieval fine-tuning step, the original BLIP code against ours.

    python benchmarks/bench_finetune.py                  # ViT-B/16 384 px, batch 32, queue 57,600 (a GPU, blip-ci)
    python benchmarks/bench_finetune.py --preset small --image-size 32 --batch-size 4 --steps 2 --warmup 0 \\
        --no-compile --device cpu                        # a CPU run of the mechanics
    python benchmarks/bench_finetune.py --json benchmarks/results/finetune-h100-YYYYMMDD.json

One step is the loop body of the original ``train_retrieval.py``: the forward of a batch of images, captions and
image ids -- ITC with every caption of the same image a positive, in the batch and in the 57,600-entry queue that
carries its image ids (``idx_queue``), with momentum distillation; ITM with one hard negative image per caption and
one hard negative caption per image, pairs of the same image excluded; momentum update and enqueue inside -- then
the two losses' backward and an AdamW step. The impls start from the same random weights (ours, loaded into the
original) and train on the same batch:

``original``  the Salesforce ``BLIP_Retrieval`` from the ``blip-ci`` package (``pip install --no-deps
              blip-ci==0.0.5``; built offline by ``benchmarks/original_blip.py``), run as ``train_retrieval.py`` runs
              it with its own ``configs/retrieval_coco.yaml`` (read from the installed package): the captions as
              strings, tokenized inside the forward and padded to 35; the attention and MLP of the last
              ``vit_ckpt_layer`` ViT blocks (4) recomputed in backward (``vit_grad_ckpt``, with the checkpoint wrapper
              of original_blip.py in place of fairscale's); the hard negatives drawn row by row with ``.item()``;
              ``torch.optim.AdamW(model.parameters(), lr=init_lr, weight_decay=weight_decay)``; fp32 and eager (TF32
              matmuls on CUDA, as bench_step.py's original);
``fast``      blip_fast's :class:`~blip_fast.models.BlipRetrieval` stepped as ``blip-fast finetune retrieval`` steps
              it with the shipped ``retrieval_coco`` config: that config's ``train`` and ``optim`` sections applied by
              the trainer's own functions (``bench_step.speed_applied_step``, i.e. blip_fast.train.speed), the task's
              forward (``RetrievalTrainer.forward``), the captions padded to the longest of the batch as the trainer's
              batches are. The config says bf16 autocast, every transformer block compiled, ViT activation
              checkpointing, torch's fused AdamW, op backends ``auto``, and no CUDA graph (``train.cuda_graph=auto``
              leaves it off for retrieval and with activation checkpointing);
``fast_graph`` the same with ``train.cuda_graph=true``: the whole step replayed as a CUDA graph, the batch's image
              ids copied in with its other tensors (blip_fast.train.cuda_graph). CUDA only; a default impl there.

One process: ``negative_all_rank`` (on in both configs) is turned off for both, since the original's branch for it
needs a process group and, on one rank, draws from the same candidates as the other branch.

Inputs: images of Gaussian noise (never all zeros); captions of the built-in synthetic scenes, one to three objects
(at batch 32: 17.7 tokens on average, padded to 25 for ours; COCO's captions average about 12-15); distinct image
ids (a batch of 32 pairs drawn at random from COCO's 113k training images seldom holds two captions of one image).
Timing as bench_step.py: ``--warmup`` untimed steps (compile happens there), then ``--steps`` steps each bracketed by
``torch.cuda.synchronize()``; the median step gives samples/s; peak memory from ``torch.cuda.max_memory_allocated``
(CUDA only), the model and its optimizer state included. Results file: docs/results-format.md, suite ``finetune``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib.util
import sys
from pathlib import Path

import torch
import yaml

from blip_fast import ops
from blip_fast.config import preset
from blip_fast.models import BlipRetrieval
from blip_fast.shapes import FINETUNE_IMAGE_SIZE
from blip_fast.train.config import load_pretrain_config
from blip_fast.train.retrieval import RetrievalTrainer

from bench_step import make_batch, measure_steps, original_blip, speed_applied_step
from results_file import command_line, device_name, write_results

IMPLS = ("original", "fast", "fast_graph")
PRESETS = ("tiny", "small", "base", "large")
CONFIG = "retrieval_coco"  # the shipped config whose train and optim sections the fast impl applies


def model_config(preset_name: str, image_size: int):
    """(BlipConfig, TrainConfig, OptimConfig, batch size) of the shipped ``retrieval_coco`` config at ``preset_name``
    and ``image_size``. ``small`` is ViT-B/16 (the smallest ViT the original builds) with the ``tiny`` preset's text
    transformer and ITC width: the smallest model both impls build, for CPU runs."""
    # the data section is the benchmark's own batch: the config is read without its annotation files
    base = "base" if preset_name == "small" else preset_name
    run = load_pretrain_config(CONFIG, ["data.kind=synthetic", f"preset={base}",
                                        f"data.transform.image_size={image_size}"])
    config = run.model_config()
    if preset_name == "small":
        tiny = preset("tiny")
        config.text, config.embed_dim = tiny.text, tiny.embed_dim
    config.negative_all_rank = False  # one process (module docstring)
    return config, run.train, run.optim, run.data.batch_size


def original_settings() -> dict:
    """The original's ``configs/retrieval_coco.yaml`` as the installed ``blip-ci`` ships it. Its numbers are read as
    floats: PyYAML reads ``1e-5`` as a string, where the original's YAML 1.2 loader read a number."""
    spec = importlib.util.find_spec("blip")
    path = Path(next(iter(spec.submodule_search_locations))) / "configs" / f"{CONFIG}.yaml"
    settings = yaml.safe_load(path.read_text())
    return {"vit_grad_ckpt": bool(settings["vit_grad_ckpt"]), "vit_ckpt_layer": int(settings["vit_ckpt_layer"]),
            "init_lr": float(settings["init_lr"]), "weight_decay": float(settings["weight_decay"]),
            "alpha": float(settings["alpha"]), "queue_size": int(settings["queue_size"])}


def our_model(config) -> BlipRetrieval:
    """Ours with the weights both impls start from (seeded), on the CPU, in training mode."""
    torch.manual_seed(0)
    return BlipRetrieval(config).train()


def original_model(config, weights: dict, checkpointed_blocks: int):
    """The original ``BLIP_Retrieval`` with our ``weights`` (the key names are the same; the original alone has BERT's
    ``position_ids`` buffers), its last ``checkpointed_blocks`` ViT blocks wrapped as its constructor wraps them with
    ``vit_grad_ckpt`` (attention and MLP apart)."""
    original_code = original_blip()
    model = original_code.build_original_retrieval(config).train()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or not all(key.endswith("embeddings.position_ids") for key in missing):
        raise RuntimeError(f"our weights do not fit the original: missing {missing}, unexpected {unexpected}")
    blocks = model.visual_encoder.blocks
    for block in blocks[len(blocks) - checkpointed_blocks:] if checkpointed_blocks else []:
        block.attn = original_code.checkpoint_wrapper(block.attn)
        block.mlp = original_code.checkpoint_wrapper(block.mlp)
    return model


def original_step(model, optimizer, batch, alpha: float) -> None:
    """One iteration of the original ``train_retrieval.py`` ``train`` loop (its metric logging left out)."""
    loss_ita, loss_itm = model(batch.images, batch.texts, alpha=alpha, idx=batch.img_ids)
    loss = loss_ita + loss_itm
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def build(impl: str, config, ours: BlipRetrieval, weights: dict | None, train, optim, original: dict | None,
          device: torch.device):
    """(model, run_step): ``run_step(batch)`` is one fine-tuning step of ``impl`` on ``device``; ``fast`` trains
    ``ours`` itself (:func:`our_model`), ``original`` starts from ``weights``, a copy of its state before training."""
    if impl == "original":
        blocks = original["vit_ckpt_layer"] if original["vit_grad_ckpt"] else 0
        model = original_model(config, weights, blocks).to(device)
        optimizer = torch.optim.AdamW(params=model.parameters(), lr=original["init_lr"],
                                      weight_decay=original["weight_decay"])
        return model, lambda batch: original_step(model, optimizer, batch, original["alpha"])
    model = ours.to(device) if impl == "fast" else our_model(config).to(device)  # fast_graph: a fresh copy
    train = dataclasses.replace(train, cuda_graph=impl == "fast_graph")  # the config's auto is the trainer's to resolve
    return model, speed_applied_step(model, train, optim, device, forward=RetrievalTrainer.forward, alpha=config.alpha)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/bench_finetune.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="base", choices=PRESETS,
                        help="model size; small: ViT-B/16 with the tiny text transformer (the smallest the original "
                             "builds); tiny: ours only")
    parser.add_argument("--image-size", type=int, default=FINETUNE_IMAGE_SIZE, help="pixels (default: 384)")
    parser.add_argument("--batch-size", type=int, help="pairs per step (default: the config's, 32)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile happens here)")
    parser.add_argument("--impl", action="append", choices=IMPLS,
                        help="only these impls, in this order (default: all three on CUDA, original and fast "
                             "elsewhere); original needs blip-ci, fast_graph CUDA")
    parser.add_argument("--no-compile", action="store_true", help="fast path without torch.compile")
    parser.add_argument("--no-checkpointing", action="store_true",
                        help="both impls without ViT activation checkpointing (both configs turn it on)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to train (default: cuda if there is one)")
    parser.add_argument("--json", help="write the results file here (format: docs/results-format.md)")
    args = parser.parse_args(argv)
    on_cuda = torch.device(args.device).type == "cuda"
    impls = list(dict.fromkeys(args.impl or (IMPLS if on_cuda else IMPLS[:2])))
    if "fast_graph" in impls and not on_cuda:
        parser.error("--impl fast_graph: CUDA graphs need a CUDA device")
    config, train, optim, config_batch = model_config(args.preset, args.image_size)
    batch_size = args.batch_size or config_batch
    if batch_size < 2 or args.steps < 1 or args.warmup < 0:
        parser.error("--batch-size must be >= 2, --steps >= 1, --warmup >= 0")
    train = dataclasses.replace(train, compile=train.compile and not args.no_compile,
                                activation_checkpointing=train.activation_checkpointing and not args.no_checkpointing)
    if {"fast", "fast_graph"} & set(impls) and train.compile and args.warmup < 1:
        parser.error(f"--warmup {args.warmup}: the fast impl compiles its blocks in its first step, which must not be "
                     "timed (--warmup 1 or more, or --no-compile)")
    if "fast_graph" in impls and args.warmup < 2:  # a shape's first step runs eagerly, its second is captured
        parser.error(f"--warmup {args.warmup}: fast_graph replays its graph from its third step (--warmup 2 or more)")
    original = None
    if "original" in impls:
        if not original_blip().is_available():
            sys.exit(f"bench_finetune.py: --impl original needs the original BLIP code: {original_blip().INSTALL_HINT}")
        if args.preset == "tiny":
            parser.error("--impl original: the original has ViT-B/16 and ViT-L/16 only (--preset small, base or large)")
        original = original_settings()
        if args.no_checkpointing:
            original["vit_grad_ckpt"] = False
        if original["queue_size"] != config.queue_size:  # both configs say 57,600; the model is built from ours
            sys.exit(f"bench_finetune.py: the original's config has a queue of {original['queue_size']}, ours "
                     f"{config.queue_size}")
        if config.queue_size % batch_size:  # its enqueue writes whole batches only
            parser.error(f"--impl original: the queue of {config.queue_size} must be a multiple of --batch-size")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the original's fp32 on Ampere and later, as in bench_step.py
        torch.backends.cudnn.allow_tf32 = True

    batch = make_batch(batch_size, args.image_size, device, "longest", max_length=config.max_text_length)
    batch.img_ids = torch.arange(batch_size, device=device)  # distinct: no two captions of one image
    text_tokens = {"mean": float(batch.attention_mask.sum(dim=1).float().mean()), "padded": batch.input_ids.shape[1]}
    case = f"retrieval_{args.preset}{args.image_size}_b{batch_size}"
    # built once (a base model takes seconds on a CPU): fast trains it, the original starts from a copy of it
    ours = our_model(config)
    weights = copy.deepcopy(ours.state_dict()) if "original" in impls else None
    records, rows, settings, backends = [], [], {}, {}
    for impl in impls:
        if impl == "original":
            scope = contextlib.nullcontext()  # the original calls none of blip_fast's ops
            settings[impl] = {"config": f"blip-ci configs/{CONFIG}.yaml", **original,
                              "precision": "fp32 + TF32" if device.type == "cuda" else "fp32",
                              "text_padding": config.max_text_length}
        else:
            scope = ops.impl_scope(train.impl)
            with scope:  # which backend each op takes here: what a later reader needs to compare runs
                backends[impl] = {name: op.select(device) for name, op in ops.OPS.items()}
            settings[impl] = {"config": CONFIG, "text_padding": "longest",
                              **{key: getattr(train, key) for key in
                                 ("precision", "compile", "activation_checkpointing", "impl")},
                              "cuda_graph": impl == "fast_graph",
                              "optim_fused": optim.fused, "init_lr": optim.init_lr, "weight_decay": optim.weight_decay}
        model, run_step = build(impl, config, ours, weights, train, optim, original, device)
        with scope:
            timing = measure_steps(run_step, batch, device, args.steps, args.warmup)
        del model, run_step
        rows.append((impl, timing))
        records.append({"case": case, "impl": impl, "metric": "samples_per_s", "value": timing["samples_per_s"]})
        if "peak_gib" in timing:
            records.append({"case": case, "impl": impl, "metric": "peak_gib", "value": timing["peak_gib"]})

    name = device_name(device)
    print(f"{case} on {name}, torch {torch.__version__}; captions: {text_tokens['mean']:.1f} tokens on average, "
          f"padded to {text_tokens['padded']} (ours) / {config.max_text_length} (original)")
    print(f"{'impl':<10} {'samples/s':>10} {'step ms':>9} {'peak GiB':>9}")
    for impl, timing in rows:
        peak = f"{timing['peak_gib']:.1f}" if "peak_gib" in timing else "-"
        print(f"{impl:<10} {timing['samples_per_s']:>10.1f} {timing['step_s'] * 1e3:>9.1f} {peak:>9}")
    speed = {impl: timing["samples_per_s"] for impl, timing in rows}
    for impl in ("fast", "fast_graph"):
        if impl in speed and "original" in speed:
            print(f"speed-up {impl} / original: {speed[impl] / speed['original']:.2f}x")
    if args.json:
        write_results(args.json, "finetune", name, command_line("finetune", argv), records, settings=settings,
                      ops=backends, text_tokens=text_tokens, threads=torch.get_num_threads())
    return 0


if __name__ == "__main__":
    sys.exit(main())
