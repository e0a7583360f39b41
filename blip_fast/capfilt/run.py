"""``blip-fast capfilt``: bootstrap a dataset as BLIP's CapFilt does (paper section 3.3), resumably, on many GPUs.

For each image of the input, the captioner samples N synthetic captions; the filter scores the image's web
caption(s) and the synthetic ones (:mod:`blip_fast.capfilt.scoring`), and a pair is kept when its ITM match
probability is above the threshold (0.5: ITM says "match"). What is written to ``out``::

    capfilt.json              the run's settings; a rerun into the same folder must have the same ones
    units/NNNNN.json          every scored pair of unit N, kept or not: the input entry's fields, caption,
                              source ("web" | "synthetic"), itm_prob, itc_sim, kept
    units/NNNNN.done.json     unit N's counts; written last, it marks the unit finished
    shards/NNNNN.tar          unit N's kept pairs as webdataset samples KEY_J.{jpg,...}, KEY_J.txt, KEY_J.json
    images/NNNNN/KEY.EXT      (shard input only) the images of kept pairs, which bootstrapped.json points to
    bootstrapped.json         every kept pair, unit by unit, in the input's JSON format plus the fields above
    report.json               kept fractions overall and per source, skipped images, the settings

**Units and resuming.** The work is cut into units (:mod:`blip_fast.capfilt.units`: each input shard, or each
``unit_size`` entries of a JSON list). A unit's files are written under temporary names and renamed, its done marker
last, so a crash leaves finished units complete and a rerun with the same settings redoes only the others. A unit's
captions are drawn from a generator seeded by (seed, unit), so they depend neither on which rank does the unit nor on
what ran before: a resumed run, and a run on any number of ranks, writes the bytes of one uninterrupted process (on
the same kind of device and batch size).

**Ranks.** Under torchrun each process takes one GPU (``LOCAL_RANK``); the units not yet finished are listed by
every rank before any starts, and rank r takes the r-th, (r + world)-th, ... of them. Rank 0 merges the units into
``bootstrapped.json`` and ``report.json`` after a barrier.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import tarfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..checkpoint import CheckpointError, atomic_write, load_checkpoint
from ..data.sample import DataStats
from ..data.transforms import TransformConfig, eval_transform
from ..models.compile import compile_blocks
from ..models.generation import GenerationConfig
from ..text import BlipTokenizer, clean_caption
from .scoring import CAPFILT_GENERATION, FILTER_TASKS, filter_pairs, synthetic_captions
from .units import CapfiltInput, ImageItem, Unit

SETTINGS = "capfilt.json"
BOOTSTRAPPED = "bootstrapped.json"
REPORT = "report.json"
SOURCES = ("web", "synthetic")
# how long a rank waits at a barrier for the others: the slowest rank's last unit, and rank 0's merge of every unit
RANK_WAIT = datetime.timedelta(hours=6)


@dataclass
class CapfiltConfig:
    captioner: str
    """Captioning checkpoint (Salesforce ``.pth`` or Hugging Face directory): the captioner."""
    filter: str
    """Retrieval (or pretraining) checkpoint: the filter."""
    data: list[str]
    """A BLIP JSON list (or several), or tar shards: files, a directory, a glob or a ``{000..009}`` range."""
    out: str
    """Output folder: new or empty, or holding an unfinished run with the same settings (which is resumed)."""
    image_root: str | None = None
    """Folder the JSON list's image paths are relative to."""
    captions_per_image: int = 1
    """Synthetic captions sampled per image (the paper: one)."""
    threshold: float = 0.5
    """A pair is kept when its ITM match probability is above this (0.5: ITM predicts "match")."""
    batch_size: int = 32
    """Images per forward of each model (the captioner decodes ``batch_size * captions_per_image`` rows)."""
    seed: int = 0
    """Seeds each unit's sampling, with the unit's number."""
    unit_size: int = 1000
    """JSON input: entries per unit (shards: one shard per unit)."""
    max_length: int = CAPFILT_GENERATION.max_length
    """Longest synthetic caption in tokens, the prompt's included (the original's 30)."""
    min_length: int = CAPFILT_GENERATION.min_length
    """Shortest synthetic caption in tokens, the prompt's included (the original's 10)."""
    top_p: float = CAPFILT_GENERATION.top_p
    """Nucleus sampling's probability mass (0.9)."""
    device: str | None = None
    """cpu, cuda or cuda:N (one process); under torchrun each rank takes cuda:LOCAL_RANK. Default: cuda if any."""
    progress: bool = True
    """Show rank 0's progress bar (images/s and time left) on stderr."""
    compile: bool = False
    """``torch.compile`` each ViT block and text layer of both models (blip_fast.models.compile), as
    ``train.compile`` does: a slower start, then faster batches on a GPU. Part of the run's settings: compiled
    kernels may round differently, so a run is resumed the way it started."""

    def __post_init__(self):
        if isinstance(self.data, (str, Path)):
            self.data = [str(self.data)]
        for name in ("captions_per_image", "batch_size", "unit_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer of at least 1; got {value!r}")
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"--threshold must be in [0, 1) (pairs above it are kept); got {self.threshold}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"--seed must be a non-negative integer; got {self.seed!r}")
        self.generation()  # its own checks: lengths, top_p

    def generation(self) -> GenerationConfig:
        return GenerationConfig(strategy="nucleus", max_length=self.max_length, min_length=self.min_length,
                                top_k=CAPFILT_GENERATION.top_k, top_p=self.top_p,
                                repetition_penalty=CAPFILT_GENERATION.repetition_penalty)


@dataclass
class _Ranks:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""

    device: torch.device
    rank: int = 0
    world: int = 1
    owns_group: bool = False

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _ranks(device: str | None) -> _Ranks:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    target = torch.device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    if world <= 1:
        return _Ranks(target)
    if target.type == "cuda":
        if target.index is not None:
            raise ValueError(f"--device {device}: under torchrun give --device cuda; each rank takes GPU LOCAL_RANK")
        target = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(target)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo", timeout=RANK_WAIT)
    return _Ranks(target, dist.get_rank(), dist.get_world_size(), owns)


def _load(path: str, tasks: tuple[str, ...], option: str, device: torch.device):
    if not Path(path).exists():
        raise FileNotFoundError(f"{option}: checkpoint not found: {path}")
    model = load_checkpoint(path)
    if model.task not in tasks:
        raise CheckpointError(f"{option} {path} holds a {model.task} model; it must be a {' or '.join(tasks)} "
                              "checkpoint")
    return model.to(device).eval()


def _unit_seed(seed: int, unit: int) -> int:
    """A seed per (run seed, unit) pair: units sample independently of each other and of the rank doing them."""
    return int(np.random.SeedSequence([seed, unit]).generate_state(1)[0])


def _dump_lines(path: Path, rows) -> None:
    """A JSON list, one entry a line, written atomically; ``rows`` may be a generator (streamed, not held)."""
    def write(temp: str) -> None:
        with open(temp, "w", encoding="utf-8") as handle:
            handle.write("[")
            for n, row in enumerate(rows):
                handle.write(("\n" if n == 0 else ",\n") + json.dumps(row, ensure_ascii=False))
            handle.write("\n]\n")
    atomic_write(path, write)


class _TarOut:
    """A tar shard written as its samples come, under a temporary name renamed when complete. Members get fixed
    metadata (as :class:`~blip_fast.data.shards.ShardWriter`), so the same samples give the same bytes; the temporary
    name is fixed too, so that what a killed run left is overwritten by the rerun."""

    def __init__(self, path: Path):
        self.path, self.temp = path, path.with_name(f".{path.name}.tmp")
        self.tar = tarfile.open(self.temp, "w", format=tarfile.USTAR_FORMAT)

    def add(self, key: str, files: dict[str, bytes]) -> None:
        for extension, data in files.items():
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self.tar.addfile(info, io.BytesIO(data))

    def commit(self) -> None:
        self.tar.close()
        with open(self.temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(self.temp, self.path)

    def abort(self) -> None:
        self.tar.close()
        self.temp.unlink(missing_ok=True)


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_bytes(data)
    os.replace(temp, path)


@dataclass
class _UnitResult:
    records: list[dict] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)


class _Capfilt:
    def __init__(self, config: CapfiltConfig, ranks: _Ranks):
        self.config, self.ranks = config, ranks
        self.out = Path(config.out)
        self.source = CapfiltInput(config.data, config.image_root, config.unit_size)
        self.generation = config.generation()
        self.tokenizer = BlipTokenizer()
        self.captioner = _load(config.captioner, ("caption",), "--captioner", ranks.device)
        self.filter = _load(config.filter, FILTER_TASKS, "--filter", ranks.device)
        if config.compile:
            for model in (self.captioner, self.filter):
                compile_blocks(model)
        self.captioner.prompt_ids(self.tokenizer, self.generation)  # --max-length leaves room for a caption
        self.caption_transform = TransformConfig.eval(self.captioner.config.vision.image_size)
        self.filter_transform = TransformConfig.eval(self.filter.config.vision.image_size)
        self.settings = {
            "captioner": os.path.abspath(config.captioner), "filter": os.path.abspath(config.filter),
            "data": [os.path.abspath(path) for path in config.data],
            "image_root": os.path.abspath(config.image_root) if config.image_root else None,
            "captions_per_image": config.captions_per_image, "threshold": config.threshold,
            "batch_size": config.batch_size, "seed": config.seed,
            "unit_size": config.unit_size if self.source.kind == "json" else None,
            "generation": asdict(self.generation), "compile": config.compile,
            "units": [unit.name for unit in self.source.units]}

    # ------------------------------------------------------------------ the output folder

    def check_output(self) -> None:
        """Refuse a folder that holds anything but a run with these settings (it is never written into)."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} exists and is not a directory")
        if not out.is_dir() or not any(out.iterdir()):
            return
        try:
            stored = json.loads((out / SETTINGS).read_text(encoding="utf-8"))
            if not isinstance(stored, dict):
                raise ValueError(f"{SETTINGS} is not an object")
        except (OSError, UnicodeDecodeError, ValueError):
            raise ValueError(f"--out {out} is not empty and holds no capfilt run ({SETTINGS}): choose a new or "
                             "empty folder") from None
        if stored != self.settings:
            differ = sorted(k for k in set(stored) | set(self.settings) if stored.get(k) != self.settings.get(k))
            raise ValueError(f"--out {out} holds a capfilt run with other settings ({', '.join(differ)}): rerun "
                             "with its settings to resume it, or choose another folder")

    def write_settings(self) -> None:
        if not (self.out / SETTINGS).exists():
            atomic_write(self.out / SETTINGS,
                         lambda t: Path(t).write_text(json.dumps(self.settings, indent=1) + "\n", encoding="utf-8"))
        for folder in ("units", "shards"):
            (self.out / folder).mkdir(exist_ok=True)

    def _paths(self, unit: Unit) -> tuple[Path, Path, Path]:
        name = f"{unit.index:05d}"
        return (self.out / "units" / f"{name}.json", self.out / "units" / f"{name}.done.json",
                self.out / "shards" / f"{name}.tar")

    def finished(self, unit: Unit) -> bool:
        records, done, shard = self._paths(unit)
        try:
            marker = json.loads(done.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return False
        return isinstance(marker, dict) and marker.get("unit") == unit.name and records.is_file() and shard.is_file()

    # ------------------------------------------------------------------ one unit

    def run_unit(self, unit: Unit, progress) -> dict:
        records_path, done_path, shard_path = self._paths(unit)
        stats, result = DataStats(), _UnitResult()
        generator = torch.Generator(device=self.ranks.device).manual_seed(_unit_seed(self.config.seed, unit.index))
        shard = _TarOut(shard_path)
        try:
            batch: list[ImageItem] = []
            for item in self.source.items(unit, stats):
                batch.append(item)
                if len(batch) == self.config.batch_size:
                    self.run_batch(unit, batch, generator, shard, result)
                    progress.update(len(batch))
                    batch = []
            if batch:
                self.run_batch(unit, batch, generator, shard, result)
                progress.update(len(batch))
            shard.commit()
            if self.source.kind == "json":  # the bar counts the unit's entries, the skipped ones too
                progress.skip(unit.stop - unit.start - result.counts["images"])
        except BaseException:
            shard.abort()
            raise
        _dump_lines(records_path, result.records)
        marker = {"unit": unit.name, "index": unit.index, "counts": dict(sorted(result.counts.items())),
                  "stats": stats.to_dict()}
        atomic_write(done_path, lambda t: Path(t).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8"))
        return marker

    def run_batch(self, unit: Unit, batch: list[ImageItem], generator, shard: _TarOut, result: _UnitResult) -> None:
        device, counts = self.ranks.device, result.counts
        pixels = torch.stack([eval_transform(item.image, self.caption_transform) for item in batch]).to(device)
        sampled = synthetic_captions(self.captioner, pixels, self.config.captions_per_image, self.tokenizer,
                                     self.generation, generator)
        if self.filter_transform.image_size != self.caption_transform.image_size:
            pixels = torch.stack([eval_transform(item.image, self.filter_transform) for item in batch]).to(device)
        texts, sources = [], []
        for item, synthetic in zip(batch, sampled, strict=True):
            usable = [text for text in synthetic if clean_caption(text)]
            counts["synthetic_generated"] += len(synthetic)
            counts["synthetic_empty"] += len(synthetic) - len(usable)  # nothing but punctuation: nothing to score
            texts.append(item.web_captions + usable)
            sources.append(["web"] * len(item.web_captions) + ["synthetic"] * len(usable))
        itm, itc = filter_pairs(self.filter, pixels, texts, batch_size=len(batch), tokenizer=self.tokenizer)
        itm, itc = itm.tolist(), itc.tolist()
        pair = 0
        for item, item_texts, item_sources in zip(batch, texts, sources, strict=True):
            counts["images"] += 1
            fields = dict(item.fields)
            image_path = None
            if self.source.kind == "shards":  # the JSON list points at the image written beside it
                image_path = f"images/{unit.index:05d}/{item.key}.{item.extension}"
                fields["image"] = image_path
            any_kept = False
            for j, (text, source) in enumerate(zip(item_texts, item_sources, strict=True)):
                kept = itm[pair] > self.config.threshold
                # the scores unrounded (each float32 exactly): the very numbers the threshold was applied to
                record = {**fields, "caption": text, "source": source, "itm_prob": itm[pair], "itc_sim": itc[pair],
                          "kept": kept}
                pair += 1
                result.records.append(record)
                counts[f"{source}_scored"] += 1
                if not kept:
                    continue
                counts[f"{source}_kept"] += 1
                any_kept = True
                meta = {k: v for k, v in record.items() if k != "kept"}
                if item.meta:
                    meta["meta"] = item.meta
                shard.add(f"{item.key}_{j}", {item.extension: item.image_bytes, "txt": text.encode("utf-8"),
                                              "json": json.dumps(meta, sort_keys=True).encode("utf-8")})
            if any_kept:
                counts["images_with_kept_pair"] += 1
                if image_path is not None:
                    _write_file(self.out / image_path, item.image_bytes)

    # ------------------------------------------------------------------ rank 0: the merged outputs

    def merge(self, seconds: float, done_before: int, images_now: int) -> dict:
        counts, stats = Counter(), DataStats()
        for unit in self.source.units:
            marker = json.loads(self._paths(unit)[1].read_text(encoding="utf-8"))
            counts.update(marker["counts"])
            stats = stats + DataStats.from_dict(marker["stats"])

        def kept_rows():
            for unit in self.source.units:
                for record in json.loads(self._paths(unit)[0].read_text(encoding="utf-8")):
                    if record.pop("kept"):
                        yield record

        _dump_lines(self.out / BOOTSTRAPPED, kept_rows())

        def share(kept: int, total: int) -> float:
            return round(kept / total, 6) if total else 0.0

        scored = counts["web_scored"] + counts["synthetic_scored"]
        kept = counts["web_kept"] + counts["synthetic_kept"]
        report = {
            "images": {"used": counts["images"], "with_kept_pair": counts["images_with_kept_pair"],
                       "skipped": dict(sorted(stats.skipped.items())), "first_skip": dict(sorted(stats.first.items()))},
            "pairs": {"scored": scored, "kept": kept, "kept_fraction": share(kept, scored)},
            "web": {"scored": counts["web_scored"], "kept": counts["web_kept"],
                    "kept_fraction": share(counts["web_kept"], counts["web_scored"])},
            "synthetic": {"generated": counts["synthetic_generated"], "empty": counts["synthetic_empty"],
                          "scored": counts["synthetic_scored"], "kept": counts["synthetic_kept"],
                          "kept_fraction": share(counts["synthetic_kept"], counts["synthetic_scored"])},
            "outputs": {"json": BOOTSTRAPPED, "shards": [f"shards/{u.index:05d}.tar" for u in self.source.units]},
            "settings": self.settings,
            # the only part that depends on how the run went (timing, ranks, units found finished)
            "run": {"ranks": self.ranks.world, "units": len(self.source.units), "units_done_before": done_before,
                    "seconds": round(seconds, 3), "images_this_run": images_now,
                    "images_per_second": round(images_now / seconds, 3) if seconds > 0 else 0.0},
        }
        atomic_write(self.out / REPORT,
                     lambda t: Path(t).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8"))
        return report


class _Progress:
    """Rank 0's bar over its own images (tqdm: images/s and time left); for shards, whose image counts are known only
    once read, the total is estimated from the units done so far."""

    def __init__(self, enabled: bool, total: int | None, units: int):
        from tqdm import tqdm

        self.units, self.done_units, self.done_images = units, 0, 0
        self.bar = tqdm(total=total, unit="img", desc="capfilt", disable=not enabled, dynamic_ncols=True)
        self.estimate = total is None

    def update(self, images: int) -> None:
        self.bar.update(images)
        self.done_images += images

    def skip(self, entries: int) -> None:
        self.bar.update(entries)

    def unit_done(self) -> None:
        self.done_units += 1
        if self.estimate and self.done_units < self.units:
            self.bar.total = round(self.done_images / self.done_units * self.units)
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def run_capfilt(config: CapfiltConfig) -> dict | None:
    """Run CapFilt (see the module docstring); rank 0 returns the report (what ``report.json`` holds), the other
    ranks None. A user mistake (a missing file, a checkpoint of the wrong task, an output folder of another run) is a
    ValueError (or OSError, CheckpointError) before any output is written."""
    start = time.perf_counter()
    ranks = _ranks(config.device)
    try:
        run = _Capfilt(config, ranks)
        run.check_output()
        ranks.barrier()  # every rank has checked the folder before rank 0 writes into it
        if ranks.rank == 0:
            run.write_settings()
        pending = [unit for unit in run.source.units if not run.finished(unit)]
        ranks.barrier()  # every rank has listed the unfinished units before any unit is written
        mine = pending[ranks.rank::ranks.world]
        total = None
        if run.source.kind == "json":
            total = sum(unit.stop - unit.start for unit in mine)
        progress = _Progress(config.progress and ranks.rank == 0, total, len(mine))
        try:
            for unit in mine:
                run.run_unit(unit, progress)
                progress.unit_done()
        finally:
            progress.close()
        images = torch.tensor([progress.done_images], device=ranks.device)
        if ranks.world > 1:  # every rank's images, for the report's images/s; also the barrier after which rank 0
            dist.all_reduce(images)  # reads every unit
        if ranks.rank != 0:
            return None
        return run.merge(time.perf_counter() - start, len(run.source.units) - len(pending), int(images))
    finally:
        ranks.close()


def summary(report: dict, out: str | Path) -> str:
    """One line: kept pairs overall and per source, and where they went."""
    def part(name: str, entry: dict) -> str:
        return f"{name} {entry['kept']} of {entry['scored']} ({100 * entry['kept_fraction']:.1f}%)"

    skipped = sum(report["images"]["skipped"].values())
    run = report["run"]
    return (f"capfilt: {report['images']['used']} images ({skipped} skipped): kept "
            f"{part('pairs', report['pairs'])}; {part('web', report['web'])}, "
            f"{part('synthetic', report['synthetic'])}; {run['images_per_second']:.1f} images/s on {run['ranks']} "
            f"rank(s); wrote {Path(out) / BOOTSTRAPPED}, {len(report['outputs']['shards'])} shards and "
            f"{Path(out) / REPORT}")
