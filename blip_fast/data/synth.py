"""``blip-fast data synth``: the built-in dataset, written in the formats real BLIP data comes in.

Scenes come from :mod:`blip_fast.data.synthetic` (one to three coloured shapes of two sizes in
five places; the caption names them). The dataset is written twice over, so that both readers
are exercised by the same data:

    DIR/shards/{split}-{i:05d}.tar    webdataset shards: KEY.jpg, KEY.txt (caption), KEY.json
                                      (key, split, caption, scene, noisy, original_caption)
    DIR/images/KEY.jpg                the same JPEG bytes, for the JSON lists
    DIR/train.json                    [{"image": "images/KEY.jpg", "caption": str, "image_id": KEY}]
    DIR/val.json, DIR/test.json       [{"image": ..., "caption": [str], "image_id": KEY}]  (Karpathy eval shape)
    DIR/noise.json                    which training captions were replaced, and their originals
    DIR/info.json                     the settings, counts per split, shard lists, and every file written

The first 90% of the scenes are ``train``, the next 5% ``val``, the last 5% ``test`` (scenes are
independent draws, so contiguous splits are fair). ``noise`` replaces that fraction of the
*training* captions with the caption of another training scene whose text differs: the ground
truth a CapFilt filter should recover. Everything is a function of ``seed``: the same arguments
write the same bytes.

``info.json`` is written last: it marks a complete dataset, and its ``files`` (every file the run
wrote, relative to ``DIR``) are all that ``overwrite`` deletes. A folder holding anything else, or
no ``info.json`` (another program's files, or a run that stopped before the end, whose files
nothing records), is refused rather than guessed at.
"""

from __future__ import annotations

import io
import json
import os
import random
from dataclasses import asdict
from pathlib import Path, PurePosixPath

from .shards import ShardWriter
from .synthetic import caption, draw, random_scene

SPLITS = ("train", "val", "test")
MANIFEST = "info.json"
FOLDERS = ("images", "shards")      # made by every run, even when they stay empty


def split_sizes(n: int, fractions: tuple[float, float, float]) -> dict[str, int]:
    """Samples per split: val and test are rounded from their fractions, train takes the rest."""
    val, test = round(n * fractions[1]), round(n * fractions[2])
    return {"train": n - val - test, "val": val, "test": test}


def prepare_output(out: Path, overwrite: bool, run_folders: tuple[str, ...] = FOLDERS) -> None:
    """Make ``out`` ready to write into: new or empty, or (``overwrite``) holding only a previous run's files,
    which are deleted. Anything else is a ValueError that names the folder (the CLI and the trainer both call).
    ``run_folders`` are made by every run; the downstream task sets (:mod:`.synth_tasks`) share these rules."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        ours = _files_written_before(out)
        if not overwrite:
            raise ValueError(f"{out} is not empty: it holds a synthetic dataset (use --overwrite to replace it)")
        folders, files = _contents(out)
        ours_folders = {str(parent) for name in ours for parent in PurePosixPath(name).parents} | set(run_folders)
        unknown = (folders - ours_folders) | (files - ours - {MANIFEST})
        unknown = sorted(name for name in unknown if not unknown.intersection(map(str, PurePosixPath(name).parents)))
        if unknown:
            listed = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
            raise ValueError(f"{out} holds files this command did not write ({listed}); --overwrite deletes only "
                             "its own files: move them, or choose another folder")
        for name in sorted(ours & files):
            (out / name).unlink()
        # then the folders those files leave empty: a run of another kind (a task set after the pretraining set)
        # makes other folders, and an empty one its manifest does not name would block the next --overwrite
        for folder in sorted(ours_folders - {"."}, key=lambda name: -len(PurePosixPath(name).parts)):
            if (out / folder).is_dir() and not any((out / folder).iterdir()):
                (out / folder).rmdir()
        (out / MANIFEST).unlink()          # last: an interrupted delete can be overwritten again
    for folder in run_folders:
        (out / folder).mkdir(parents=True, exist_ok=True)


def write_manifest(out: Path, info: dict, written: list[str]) -> dict:
    """Write ``info`` with ``files`` (every file the run wrote, relative to ``out``) as ``info.json``. Call it last:
    the manifest marks a complete dataset, and its files are all that a later ``overwrite`` deletes."""
    info["files"] = sorted(written)
    (out / MANIFEST).write_text(json.dumps(info, indent=1) + "\n")
    return info


def _files_written_before(out: Path) -> set[str]:
    """The files a previous run wrote into the non-empty folder ``out`` (its manifest), or a ValueError."""
    not_ours = (f"{out} is not empty and is not a dataset this command wrote (no {MANIFEST} lists its files; a run "
                "that stopped early writes none): choose an empty folder, or delete it by hand")
    try:
        files = json.loads((out / MANIFEST).read_text(encoding="utf-8")).get("files")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        raise ValueError(not_ours) from None
    if not isinstance(files, list) or not all(_inside(name) for name in files):
        raise ValueError(not_ours)
    return set(files)


def _inside(name) -> bool:
    """Whether a manifest entry is a plain relative path that stays inside the dataset folder."""
    if not isinstance(name, str) or not name or "\\" in name:
        return False
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts and str(path) == name


def _contents(out: Path) -> tuple[set[str], set[str]]:
    """The folders and the other entries under ``out``, as relative POSIX paths. Symbolic links are not followed:
    a link to a folder is an entry of its own, so no file behind it can pass for one of ours."""
    folders, others = set(), set()
    for root, dirs, names in os.walk(out):
        base = PurePosixPath(Path(root).relative_to(out).as_posix())
        for name in list(dirs):
            if (Path(root) / name).is_symlink():
                dirs.remove(name)
                others.add(str(base / name))
            else:
                folders.add(str(base / name))
        others.update(str(base / name) for name in names)
    return folders, others


def _mismatched(index: int, captions: list[str], rng: random.Random) -> int:
    """Another training scene whose caption differs from scene ``index``'s."""
    for _ in range(1000):
        other = rng.randrange(len(captions))
        if captions[other] != captions[index]:
            return other
    raise ValueError("cannot add caption noise: the training captions are all the same")


def write_synthetic_dataset(out: str | Path, n: int, *, noise: float = 0.0, image_size: int = 128, seed: int = 0,
                            shard_size: int = 100, quality: int = 90,
                            fractions: tuple[float, float, float] = (0.9, 0.05, 0.05),
                            overwrite: bool = False) -> dict:
    """Write ``n`` synthetic samples to ``out`` (layout in the module docstring); returns ``info.json``'s content."""
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"--noise must be a fraction in [0, 1], got {noise}")
    if image_size < 8:
        raise ValueError(f"--image-size must be at least 8, got {image_size}")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
    if seed < 0:
        raise ValueError(f"--seed must be non-negative, got {seed}")
    sizes = split_sizes(n, fractions)
    if sizes["train"] < 1:
        raise ValueError(f"{n} samples leave no training split")
    out = Path(out)
    prepare_output(out, overwrite)

    # scenes first (the noise draws need every training caption), then one drawing per scene
    scene_rng, draw_rng, noise_rng = random.Random(seed), random.Random(seed + 1), random.Random(seed + 2)
    scenes = [random_scene(scene_rng) for _ in range(n)]
    originals = [caption(scene) for scene in scenes]
    captions = list(originals)
    train = originals[:sizes["train"]]
    noisy = sorted(noise_rng.sample(range(sizes["train"]), round(noise * sizes["train"])))
    width = max(6, len(str(n - 1)))
    keys = [f"{i:0{width}d}" for i in range(n)]
    noise_record = {}
    for i in noisy:
        source = _mismatched(i, train, noise_rng)
        captions[i] = originals[source]
        noise_record[keys[i]] = {"original_caption": originals[i], "caption": captions[i], "caption_from": keys[source]}

    info = {"n": n, "seed": seed, "noise": noise, "noisy": len(noise_record), "image_size": image_size,
            "shard_size": shard_size, "quality": quality, "splits": {}}
    written = []
    first = 0
    for split in SPLITS:
        indices = range(first, first + sizes[split])
        first += sizes[split]
        entries = []
        with ShardWriter(out / "shards", split, shard_size) as writer:
            for i in indices:
                buffer = io.BytesIO()
                draw(scenes[i], image_size, draw_rng).save(buffer, "JPEG", quality=quality)
                jpeg = buffer.getvalue()
                image = f"images/{keys[i]}.jpg"
                (out / image).write_bytes(jpeg)
                written.append(image)
                meta = {"key": keys[i], "split": split, "caption": captions[i],
                        "scene": [asdict(obj) for obj in scenes[i]], "noisy": keys[i] in noise_record}
                if keys[i] in noise_record:
                    meta["original_caption"] = originals[i]
                writer.write(keys[i], {"jpg": jpeg, "txt": captions[i].encode("utf-8"),
                                       "json": json.dumps(meta, sort_keys=True).encode("utf-8")})
                text = captions[i] if split == "train" else [captions[i]]
                entries.append({"image": image, "caption": text, "image_id": keys[i]})
        (out / f"{split}.json").write_text(json.dumps(entries, indent=0) + "\n")
        shards = [p.relative_to(out).as_posix() for p in writer.paths]
        written += [*shards, f"{split}.json"]
        info["splits"][split] = {"samples": sizes[split], "json": f"{split}.json", "shards": shards}
    (out / "noise.json").write_text(json.dumps({"fraction": noise, "seed": seed, "count": len(noise_record),
                                                "samples": noise_record}, indent=1, sort_keys=True) + "\n")
    return write_manifest(out, info, [*written, "noise.json"])
