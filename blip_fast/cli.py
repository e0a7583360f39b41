"""``blip-fast``: the command line. A thin layer over :mod:`blip_fast.api` and friends.

A user mistake (a missing file, a checkpoint of another task, a bad option, a destination that
cannot be written) ends with one line ``error: ...`` and exit status 2, never a stack trace.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .checkpoint import CheckpointError
from .config import ConfigError
from .images import ImageError

# OSError: a path that cannot be written (an existing directory or file in the way, no permission, a full disk)
USER_ERRORS = (CheckpointError, ConfigError, ImageError, OSError, ValueError, TypeError)


def _device(name: str | None) -> str:
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as error:  # not a device name torch knows
        raise ValueError(f"--device {name}: {str(error).splitlines()[0]}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: blip-fast runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return name


def cmd_caption(args) -> int:
    from .api import load
    from .parity import DTYPE_NAMES

    dtype = {name: dtype for dtype, name in DTYPE_NAMES.items()}[args.dtype]
    blip = load(args.checkpoint, task="caption", device=_device(args.device), image_size=args.image_size,
                dtype=dtype, compile=args.compile)
    captions = blip.caption(args.images, strategy=args.strategy, max_length=args.max_length,
                            min_length=args.min_length, num_beams=args.num_beams, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, num_return_sequences=args.num_return_sequences,
                            batch_size=args.batch_size, progress=sys.stderr.isatty() and len(args.images) > 1)
    paths = [path for path in args.images for _ in range(args.num_return_sequences)]
    for path, text in zip(paths, captions, strict=True):
        print(f"{path}\t{text}")
    return 0


def cmd_answer(args) -> int:
    from .api import load

    blip = load(args.checkpoint, task="vqa", device=_device(args.device), image_size=args.image_size)
    print(blip.answer([args.image], [args.question])[0])
    return 0


def cmd_match(args) -> int:
    from .api import load

    blip = load(args.checkpoint, device=_device(args.device), image_size=args.image_size)
    similarity = blip.similarity([args.image], args.texts)[0]
    itm = blip.match([args.image] * len(args.texts), args.texts)
    print("itm_prob\titc_sim\ttext")
    for text, prob, sim in zip(args.texts, itm.tolist(), similarity.tolist(), strict=True):
        print(f"{prob:.4f}\t{sim:.4f}\t{text}")
    return 0


def cmd_convert(args) -> int:
    from .checkpoint import load_checkpoint, save_hf, save_salesforce

    model = load_checkpoint(args.source, args.task)
    if args.to == "hf":
        save_hf(model, args.destination)
    else:
        save_salesforce(model, args.destination)
    print(f"wrote {model.task} model to {args.destination} ({args.to} format)")
    return 0


def cmd_info(args) -> int:
    from .checkpoint import load_checkpoint
    from .config import config_to_dict

    model = load_checkpoint(args.checkpoint)
    print(json.dumps({"task": model.task, "parameters": sum(p.numel() for p in model.parameters()),
                      "config": config_to_dict(model.config)}, indent=2))
    return 0


def cmd_parity(args) -> int:
    import torch

    from .parity import DTYPE_NAMES, format_table, run_parity

    device = torch.device(_device(args.device))
    names = {v: k for k, v in DTYPE_NAMES.items()}
    dtypes = [names[d] for d in args.dtype] if args.dtype else None
    rows = run_parity(device, ops=args.op, dtypes=dtypes)
    if not rows:
        print(f"no fast implementation is available on {device} for the selected ops")
        return 0
    print(format_table(rows))
    failed = [r for r in rows if not r.passed]
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed")
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=2))
    return 1 if failed else 0


def cmd_data_synth(args) -> int:
    import time

    from .data.synth import write_synthetic_dataset
    from .data.synth_tasks import write_task_dataset

    start = time.perf_counter()
    if args.task:
        unused = [option for option, value in (("--noise", args.noise), ("--shard-size", args.shard_size))
                  if value is not None]
        if unused:
            raise ValueError(f"{' and '.join(unused)} apply to the pretraining set only, not to --task {args.task}")
        info = write_task_dataset(args.out, args.task, args.n, image_size=args.image_size, seed=args.seed,
                                  overwrite=args.overwrite)
        counts = "; ".join(f"{split}: " + ", ".join(f"{value} {name}" for name, value in entry.items()
                                                    if isinstance(value, int))
                           for split, entry in info["splits"].items())
        print(f"wrote the synthetic {args.task} set ({counts}) to {args.out} in {time.perf_counter() - start:.1f} s")
        return 0
    noise = 0.0 if args.noise is None else args.noise
    shard_size = 100 if args.shard_size is None else args.shard_size
    info = write_synthetic_dataset(args.out, args.n, noise=noise, image_size=args.image_size, seed=args.seed,
                                   shard_size=shard_size, overwrite=args.overwrite)
    counts = ", ".join(f"{split} {entry['samples']}" for split, entry in info["splits"].items())
    print(f"wrote {args.n} synthetic samples ({counts}; {info['noisy']} noisy training captions) to {args.out} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_pretrain(args) -> int:
    from .train.config import load_pretrain_config, pretrain_config_to_dict
    from .train.divergence import TrainingDiverged
    from .train.pretraining import pretrain

    config = load_pretrain_config(args.config, args.overrides)
    if args.print_config:
        print(json.dumps(pretrain_config_to_dict(config), indent=1))
        return 0
    resume = True if args.resume == "latest" else args.resume
    try:
        pretrain(config, resume=resume or False)
    except TrainingDiverged as error:  # not a user mistake, but no stack trace either: the message says it all
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


# blip-fast finetune TASK: the trainer of each task and its shipped config (the original's)
FINETUNE_TASKS = {"retrieval": "retrieval_coco", "caption": "caption_coco", "vqa": "vqa", "nlvr": "nlvr"}


def cmd_finetune(args) -> int:
    from .train.caption import finetune_caption
    from .train.config import load_pretrain_config, pretrain_config_to_dict
    from .train.divergence import TrainingDiverged
    from .train.nlvr import finetune_nlvr
    from .train.retrieval import finetune_retrieval
    from .train.vqa import finetune_vqa

    config = load_pretrain_config(args.config or FINETUNE_TASKS[args.task], args.overrides)
    if args.print_config:
        print(json.dumps(pretrain_config_to_dict(config), indent=1))
        return 0
    run = {"retrieval": finetune_retrieval, "caption": finetune_caption, "vqa": finetune_vqa,
           "nlvr": finetune_nlvr}[args.task]
    try:
        run(config, resume=(True if args.resume == "latest" else args.resume) or False)
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def cmd_eval_retrieval(args) -> int:
    from .data.annotations import RetrievalAnnotations
    from .evaluation.retrieval import evaluate_retrieval

    model = _evaluated_model(args, ("retrieval", "pretrain"))
    result = evaluate_retrieval(model, RetrievalAnnotations(args.annotations, args.image_root),
                                model.config.vision.image_size, limit=args.limit, itm_k=args.k,
                                batch_size=args.batch_size)
    return _report(result, args.json)


def _evaluated_model(args, tasks: tuple[str, ...]):
    from .api import load

    blip = load(args.checkpoint, device=_device(args.device), image_size=args.image_size)
    if blip.model.task not in tasks:
        raise ValueError(f"{args.checkpoint} holds a {blip.model.task} model; this evaluation needs a "
                         f"{' or '.join(tasks)} checkpoint")
    return blip.model


def _report(result, json_path: str | None) -> int:
    print(result.summary())
    if json_path:
        from .checkpoint import atomic_write

        atomic_write(json_path, lambda t: Path(t).write_text(json.dumps(result.metrics, indent=1)))
    return 0


def cmd_eval_video(args) -> int:
    from .data.video import VideoAnnotations
    from .evaluation.video_retrieval import evaluate_video_retrieval

    model = _evaluated_model(args, ("retrieval", "pretrain"))
    result = evaluate_video_retrieval(model, VideoAnnotations(args.annotations, args.video_root),
                                      model.config.vision.image_size, frames=args.frames, itm_k=args.k,
                                      batch_size=args.batch_size, limit=args.limit, decoder=args.decoder)
    return _report(result, args.json)


def cmd_eval_caption(args) -> int:
    from .data.annotations import RetrievalAnnotations
    from .evaluation.captioning import evaluate_captioning

    model = _evaluated_model(args, ("caption",))
    result = evaluate_captioning(model, RetrievalAnnotations(args.annotations, args.image_root),
                                 model.config.vision.image_size, limit=args.limit, batch_size=args.batch_size,
                                 java=not args.no_java)
    return _report(result, args.json)


def cmd_eval_nocaps(args) -> int:
    from .evaluation.nocaps import evaluate_nocaps, read_nocaps_images, read_nocaps_references

    if not args.out and not args.references:
        raise ValueError("nothing to do: give --out (the submission file for the NoCaps server), --references "
                         "(nocaps_val_4500_captions.json, scores per domain here), or both")
    if args.json and not args.references:
        raise ValueError("--json writes the metrics, which need --references (nocaps_val_4500_captions.json)")
    for path in (args.out, args.json):
        if path and Path(path).is_dir():  # found now rather than after captioning every image
            raise ValueError(f"cannot write {path}: it is a directory")
    images = read_nocaps_images(args.annotations, args.image_root, args.limit)
    references = read_nocaps_references(args.references) if args.references else None
    model = _evaluated_model(args, ("caption",))
    result = evaluate_nocaps(model, images, model.config.vision.image_size, references, batch_size=args.batch_size,
                             java=not args.no_java, submission=args.out)
    if args.out:
        print(f"wrote {len(result.captions)} captions to {args.out}")
    return _report(result, args.json)


def cmd_eval_vqa(args) -> int:
    from .data.annotations import VqaAnnotations, load_json_list
    from .evaluation.vqa import evaluate_vqa

    model = _evaluated_model(args, ("vqa",))
    if args.inference == "rank" and not args.answer_list:
        raise ValueError("--inference rank ranks the candidate answers of --answer-list (answer_list.json)")
    answer_list = load_json_list(args.answer_list) if args.answer_list else None
    result = evaluate_vqa(model, VqaAnnotations(args.questions, args.image_root), model.config.vision.image_size,
                          answer_list, inference=args.inference, k=args.k, batch_size=args.batch_size,
                          limit=args.limit)
    if args.answers:
        result.write_answers(args.answers)
    return _report(result, args.json)


def cmd_eval_nlvr(args) -> int:
    from .data.annotations import NlvrAnnotations
    from .evaluation.nlvr import evaluate_nlvr

    model = _evaluated_model(args, ("nlvr",))
    result = evaluate_nlvr(model, NlvrAnnotations(args.annotations, args.image_root), model.config.vision.image_size,
                           batch_size=args.batch_size, limit=args.limit)
    return _report(result, args.json)


def cmd_capfilt(args) -> int:
    from .capfilt import CapfiltConfig, run_capfilt, summary

    device = _device(args.device) if args.device else None
    config = CapfiltConfig(captioner=args.captioner, filter=args.filter, data=args.data, out=args.out,
                           image_root=args.image_root, captions_per_image=args.captions_per_image,
                           threshold=args.threshold, batch_size=args.batch_size, seed=args.seed,
                           unit_size=args.unit_size, max_length=args.max_length, min_length=args.min_length,
                           top_p=args.top_p, device=device, compile=args.compile)
    report = run_capfilt(config)
    if report is not None:  # rank 0 of a torchrun job, or the only process
        print(summary(report, args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip-fast", description="The fastest correct BLIP.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log which op backends are picked; show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    def checkpoint_options(p):
        p.add_argument("--checkpoint", "-c", required=True,
                       help="Salesforce .pth file or Hugging Face model directory")
        p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
        p.add_argument("--image-size", type=int, help="resize images to this size (default: the checkpoint's)")

    p = sub.add_parser("pretrain", help="pretrain BLIP (ITC + ITM + LM); default: the tiny model on built-in "
                       "synthetic scenes, a few minutes on a CPU, then zero-shot retrieval",
                       description="Pretrain BLIP from a YAML config. Overrides: section.key=value, e.g. "
                       "data.batch_size=96 optim.init_lr=2e-4 train.max_steps=1000 'data.paths=[a.json,b.json]'.")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (values are YAML)")
    p.add_argument("--config", help="YAML file, or a shipped config: tiny-synthetic (default), base, large")
    p.add_argument("--resume", nargs="?", const="latest",
                   help="continue from the latest checkpoint of train.out, or from this checkpoint file")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(run=cmd_pretrain)

    p = sub.add_parser("finetune", help="fine-tune a downstream task (retrieval, caption, vqa, nlvr) with the "
                       "original's recipe, usually from a pretrained checkpoint (train.init_from=...)",
                       description="Fine-tune BLIP on a downstream task from a YAML config (default: the original's "
                       "config of the task: retrieval_coco, caption_coco, vqa, nlvr). Overrides: section.key=value, "
                       "e.g. train.init_from=model_base.pth 'data.paths=[coco_karpathy_train.json]'.")
    p.add_argument("task", choices=tuple(FINETUNE_TASKS), help="the downstream task")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (values are YAML)")
    p.add_argument("--config", help="YAML file, or a shipped config: retrieval_coco, retrieval_flickr, caption_coco, "
                   "vqa, nlvr")
    p.add_argument("--resume", nargs="?", const="latest",
                   help="continue from the latest checkpoint of train.out, or from this checkpoint file")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(run=cmd_finetune)

    p = sub.add_parser("eval", help="evaluate a checkpoint on a downstream task's split (retrieval, caption, vqa, "
                       "nlvr)")
    eval_sub = p.add_subparsers(dest="eval_task", required=True)
    p = eval_sub.add_parser("retrieval", help="image-text retrieval: ITC top-k re-ranked by ITM, recall@1/5/10",
                            description="Recall@1/5/10 both ways as the original's train_retrieval.py evaluation: "
                            "ITC similarity of every pair, the top k of each image and caption re-ranked by "
                            "ITM logit + ITC similarity.")
    checkpoint_options(p)
    p.add_argument("--annotations", required=True,
                   help="the split: [{\"image\": path, \"caption\": [captions]}] (coco_karpathy_test.json)")
    p.add_argument("--image-root", help="folder the image paths are relative to")
    p.add_argument("--k", type=int, default=256, help="candidates re-ranked by ITM (COCO 256, Flickr30k 128; 0: "
                   "ITC only)")
    p.add_argument("--limit", type=int, help="only the first N images (and their captions)")
    p.add_argument("--batch-size", type=int, default=64, help="images, captions or ITM pairs per forward (64)")
    p.add_argument("--json", help="also write the metrics to this JSON file")
    p.set_defaults(run=cmd_eval_retrieval)

    # defaults: the original's configs/retrieval_msrvtt.yaml (kept as blip_fast/configs/retrieval_msrvtt.yaml)
    p = eval_sub.add_parser("video", help="zero-shot video-text retrieval (MSRVTT): frames through the ViT, ITC top-k "
                            "re-ranked by ITM, recall@1/5/10 and median rank",
                            description="Zero-shot text-video retrieval as the original's eval_retrieval_video.py: "
                            "8 frames a video, the video's ITC feature the mean of its frames', ITM over all its "
                            "frames' tokens; the top k of each video and caption re-ranked by ITM logit + ITC "
                            "similarity.")
    checkpoint_options(p)
    p.add_argument("--annotations", required=True,
                   help="JSON lines {\"clip_name\": name, \"caption\": str}, one video each (msrvtt_test.jsonl)")
    p.add_argument("--video-root", required=True, help="folder of the videos: CLIP_NAME.mp4 for each entry")
    p.add_argument("--frames", type=int, default=8, help="frames sampled per video (num_frm_test, 8)")
    p.add_argument("--k", type=int, default=128, help="candidates re-ranked by ITM (k_test, 128; 0: ITC only)")
    p.add_argument("--decoder", choices=("auto", "dali", "cpu"), default="auto",
                   help="video decoding: dali (NVDEC on a GPU; VP8/VP9/MJPEG only on a CPU), cpu (PyAV), auto "
                        "(dali for a model on a GPU when DALI is installed, else cpu)")
    p.add_argument("--limit", type=int, help="only the first N videos (and their captions)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="videos per ViT forward (times --frames frames), captions or ITM pairs per forward (64)")
    p.add_argument("--json", help="also write the metrics to this JSON file")
    p.set_defaults(run=cmd_eval_video)

    def split_options(p, what: str):
        checkpoint_options(p)
        p.add_argument("--image-root", help="folder the image paths are relative to")
        p.add_argument("--limit", type=int, help=f"only the first N {what}")
        p.add_argument("--batch-size", type=int, default=32, help=f"{what} per forward (32)")
        p.add_argument("--json", help="also write the metrics to this JSON file")

    p = eval_sub.add_parser("caption", help="captioning: beam search (3 beams, 5-20 tokens), then BLEU, METEOR, "
                            "ROUGE-L, CIDEr (SPICE where installed)")
    p.add_argument("--annotations", required=True,
                   help="the split: [{\"image\": path, \"caption\": [references]}] (coco_karpathy_test.json)")
    p.add_argument("--no-java", action="store_true",
                   help="tokenize in Python and skip METEOR and SPICE (no Java needed; not the official numbers)")
    split_options(p, "images")
    p.set_defaults(run=cmd_eval_caption)

    p = eval_sub.add_parser("nocaps", help="NoCaps: captions as the original eval_nocaps.py (3 beams, 5-20 tokens, "
                            "repetition penalty 1.1) for the EvalAI server; with --references, COCO caption metrics "
                            "per domain",
                            description="Caption a NoCaps split for submission to the NoCaps server on EvalAI "
                            "([{\"image_id\", \"caption\"}]) and, given the public validation references, score the "
                            "captions per domain (in-domain, near-domain, out-domain, entire) with the COCO caption "
                            "metrics.")
    p.add_argument("--annotations", required=True,
                   help="the split: [{\"image\": path, \"img_id\": int}] (nocaps_val.json, nocaps_test.json)")
    p.add_argument("--references", help="the validation references in COCO caption format, with each image's "
                   "domain (nocaps_val_4500_captions.json): score the captions here")
    p.add_argument("--out", help="write the captions here as the server's submission file "
                   "[{\"image_id\": int, \"caption\": str}]")
    p.add_argument("--no-java", action="store_true",
                   help="tokenize in Python and skip METEOR and SPICE (no Java needed; not the official numbers)")
    split_options(p, "images")
    p.set_defaults(run=cmd_eval_nocaps)

    p = eval_sub.add_parser("vqa", help="VQA: answers by ranking the answer list (or generation), VQA accuracy "
                            "where the questions carry their answers, the official result file")
    p.add_argument("--questions", required=True, help="[{\"question_id\", \"question\", \"image\"[, \"answer\"]}]")
    p.add_argument("--answer-list", help="candidate answers (answer_list.json), needed by --inference rank")
    p.add_argument("--inference", choices=("rank", "generate"), default="rank", help="rank (default) or generate")
    p.add_argument("--k", type=int, default=128, help="rank: answers kept by their first token, then scored (128)")
    p.add_argument("--answers", help="write the answers here in the official format [{question_id, answer}]")
    split_options(p, "questions")
    p.set_defaults(run=cmd_eval_vqa)

    p = eval_sub.add_parser("nlvr", help="NLVR2: accuracy of true/false statements about image pairs")
    p.add_argument("--annotations", required=True,
                   help="[{\"images\": [a, b], \"sentence\": str, \"label\": \"True\"|\"False\"}]")
    split_options(p, "statements")
    p.set_defaults(run=cmd_eval_nlvr)

    p = sub.add_parser("caption", help="caption images with a captioning checkpoint")
    p.add_argument("images", nargs="+", help="image files")
    checkpoint_options(p)
    p.add_argument("--strategy", choices=("beam", "greedy", "nucleus"), default="beam", help="decoding (beam)")
    p.add_argument("--max-length", type=int, default=30, help="tokens, prompt included (30)")
    p.add_argument("--min-length", type=int, default=10, help="tokens, prompt included (10)")
    p.add_argument("--num-beams", type=int, default=3, help="beams for beam search (3)")
    p.add_argument("--top-k", type=int, default=50, help="most likely tokens sampling keeps before top-p; 0: all (50)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus mass for sampling (0.9)")
    p.add_argument("--seed", type=int, help="seed for nucleus sampling")
    p.add_argument("--num-return-sequences", type=int, default=1,
                   help="captions per image for nucleus sampling, a line each (1)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images read and captioned at a time (64); a progress bar on a terminal")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="of the weights and images (fp32; bf16 is for GPUs, where it is faster)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the ViT blocks and text layers: a slower start, faster on a GPU")
    p.set_defaults(run=cmd_caption)

    p = sub.add_parser("answer", help="answer a question about an image with a VQA checkpoint")
    p.add_argument("image", help="image file")
    p.add_argument("question", help="the question")
    checkpoint_options(p)
    p.set_defaults(run=cmd_answer)

    p = sub.add_parser("match", help="ITM probability and ITC similarity of one image with texts")
    p.add_argument("image", help="image file")
    p.add_argument("texts", nargs="+", help="candidate texts")
    checkpoint_options(p)
    p.set_defaults(run=cmd_match)

    p = sub.add_parser("capfilt", help="bootstrap a dataset as BLIP's CapFilt: synthetic captions by nucleus "
                       "sampling, every web and synthetic caption filtered by ITM; resumable, one process per GPU "
                       "under torchrun",
                       description="For each image of --data, sample --captions-per-image captions with the "
                       "--captioner; keep each (image, caption) pair, web and synthetic, whose ITM match probability "
                       "under the --filter is above --threshold. Writes OUT/bootstrapped.json, OUT/shards/*.tar and "
                       "OUT/report.json; a rerun with the same options resumes where a crash stopped "
                       "(docs/capfilt.md).")
    p.add_argument("--captioner", required=True, help="captioning checkpoint (.pth or Hugging Face directory)")
    p.add_argument("--filter", required=True, help="retrieval (or pretraining) checkpoint: its ITM head filters")
    p.add_argument("--data", required=True, nargs="+",
                   help="BLIP JSON list(s) [{\"image\", \"caption\"}], or tar shards (files, a directory, a glob, "
                        "a {000..009} range)")
    p.add_argument("--image-root", help="folder the JSON list's image paths are relative to")
    p.add_argument("--out", required=True, help="output folder: new or empty, or an unfinished run's (resumed)")
    p.add_argument("--captions-per-image", type=int, default=1, help="synthetic captions per image (1, the paper's)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="keep pairs whose ITM match probability is above this (0.5: ITM says match)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward of each model (32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling, with each unit's number (0)")
    p.add_argument("--unit-size", type=int, default=1000,
                   help="JSON input: entries per unit of work, the granularity of resuming (1000; shards: one each)")
    p.add_argument("--max-length", type=int, default=30, help="synthetic caption tokens, prompt included (30)")
    p.add_argument("--min-length", type=int, default=10, help="synthetic caption tokens, prompt included (10)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (0.9)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available; under torchrun each rank "
                   "takes cuda:LOCAL_RANK)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile both models' ViT blocks and text layers: a slower start, faster on a GPU "
                        "(a run resumes only with the same choice)")
    p.set_defaults(run=cmd_capfilt)

    p = sub.add_parser("convert", help="convert between Salesforce .pth and Hugging Face directories")
    p.add_argument("source", help="checkpoint to read (file or Hugging Face directory)")
    p.add_argument("destination", help="file (salesforce) or directory (hf) to write")
    p.add_argument("--to", choices=("salesforce", "hf"), required=True, help="format to write")
    p.add_argument("--task", choices=("pretrain", "retrieval", "caption", "vqa", "nlvr"),
                   help="expected task of the source (checked)")
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("info", help="task, size and configuration of a checkpoint")
    p.add_argument("checkpoint", help="Salesforce .pth file or Hugging Face model directory")
    p.set_defaults(run=cmd_info)

    p = sub.add_parser("parity", help="check every fast op against its reference on this device")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--op", action="append", help="only this op (repeatable)")
    p.add_argument("--dtype", action="append", choices=("fp32", "fp16", "bf16"),
                   help="only this dtype (repeatable)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.set_defaults(run=cmd_parity)

    p = sub.add_parser("data", help="datasets: write the built-in synthetic dataset")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("synth", help="write synthetic scenes as webdataset shards and BLIP JSON lists")
    p.add_argument("--out", required=True, help="output directory (created; must be empty unless --overwrite)")
    p.add_argument("--task", choices=("retrieval", "vqa", "nlvr", "video"),
                   help="a downstream set in the original BLIP's annotation format instead of the pretraining set: "
                        "retrieval (Karpathy COCO, 5 captions per image), vqa (VQA v2), nlvr (NLVR2 pairs), video "
                        "(MSRVTT test videos and msrvtt_test.jsonl)")
    p.add_argument("--n", type=int, required=True,
                   help="number of samples (90%% train, 5%% val, 5%% test); with --task: images (nlvr: pairs), "
                        "80/10/10%% (vqa: 90%% train, 10%% test; video: videos, all test)")
    # None: not given (the pretraining set's default), so that --task can refuse an option it has no use for
    p.add_argument("--noise", type=float,
                   help="fraction of training captions replaced by another scene's, recorded in noise.json (0)")
    p.add_argument("--image-size", type=int, default=128, help="image side in pixels (128)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same bytes (0)")
    p.add_argument("--shard-size", type=int, help="samples per tar shard (100)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a synthetic dataset already in --out (only the files this command writes)")
    p.set_defaults(run=cmd_data_synth)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `--resume key=value` means the latest checkpoint and an override: a checkpoint path is never a config override
    resume = getattr(args, "resume", None)
    if resume and "=" in resume and not Path(resume).exists():
        args.resume = "latest"
        args.overrides.append(resume)
    # config overrides may come after options too (pretrain --config base data.batch_size=96)
    if extra and getattr(args, "overrides", None) is not None and all("=" in a and not a.startswith("-")
                                                                       for a in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.run(args)
    except KeyboardInterrupt:
        hint = (" (checkpoints are written atomically; continue with --resume)"
                if args.command in ("pretrain", "finetune") else "")
        print(f"interrupted{hint}", file=sys.stderr)
        return 130
    except USER_ERRORS as error:
        if args.verbose:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
