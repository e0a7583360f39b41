"""Training checkpoints: everything a run needs to continue exactly, written atomically, the last K kept.

One file per checkpoint, ``<out>/checkpoints/step-00001000.pt``, holding

    model       the full state dict: online and momentum weights, queues and their pointer
    optimizer   AdamW moments and step counts
    progress    optimizer steps so far, epoch, steps into the epoch
    data        the loader's position (per-rank, see blip_fast.data.loader), one entry per rank
    rng         torch (CPU and every CUDA device), Python and NumPy generator states, and the
                hard-negative sampler's generator, one entry per rank
    config      the PretrainConfig of the run
    model_config  the resolved BlipConfig (a resume refuses a different architecture or recipe)

The file is written to a temporary name and renamed (blip_fast.checkpoint.io.atomic_write), so
an interrupted write never replaces a good checkpoint (its temporary file is removed when the run
starts again); older checkpoints are deleted only after the new one is in place. A run resumed
from an older checkpoint moves the later ones aside (:func:`set_aside`) instead of rotating them
away or resuming from them next time. Learning rate and alpha are recomputed from ``progress``.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from ..checkpoint.io import CheckpointError, load_torch, save_torch
from ..checkpoint.salesforce import TRAINING_CONFIG_KEY

NAME = re.compile(r"step-(\d{8})\.pt$")
TEMP_NAME = re.compile(r"\.step-\d{8}\.pt\..+\.tmp")  # blip_fast.checkpoint.io.atomic_write's temporary names


def checkpoint_dir(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def checkpoint_path(out: str | Path, step: int) -> Path:
    return checkpoint_dir(out) / f"step-{step:08d}.pt"


def list_checkpoints(out: str | Path) -> list[Path]:
    """The run's checkpoints, oldest first."""
    folder = checkpoint_dir(out)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := NAME.search(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: str | Path) -> int:
    return int(NAME.search(Path(path).name).group(1))


def set_aside(out: str | Path, paths: list[Path], name: str) -> Path:
    """Move checkpoints into ``<out>/checkpoints/<name>/``, where neither the rotation nor a resume looks."""
    folder = checkpoint_dir(out) / name
    folder.mkdir(parents=True, exist_ok=True)
    for path in paths:
        os.replace(path, folder / path.name)
    return folder


def remove_stale_temp_files(out: str | Path) -> list[Path]:
    """Delete what interrupted checkpoint writes left behind (``atomic_write``'s ``.step-*.pt.*.tmp`` files in the
    run's checkpoint folder, which only this run writes) and return their paths."""
    folder = checkpoint_dir(out)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if TEMP_NAME.fullmatch(p.name) and p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def latest_checkpoint(out: str | Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def rng_state(generator: torch.Generator | None) -> dict:
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    # plain lists: checkpoints are read with weights_only=True, which refuses NumPy arrays
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, keys.tolist(), position, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["sampler"] = generator.get_state()
    return state


def set_rng_state(state: dict, generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_python_state(state["python"]))
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "sampler" in state:
        generator.set_state(state["sampler"])


def _python_state(state):
    # weights_only loading turns the state's tuples into lists; random.setstate wants tuples
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def save_training_checkpoint(out: str | Path, step: int, payload: dict, keep_last: int) -> Path:
    """Write ``payload`` as the run's checkpoint of ``step``, then delete all but the newest ``keep_last``."""
    path = save_torch(payload, checkpoint_path(out, step))
    for old in list_checkpoints(out)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def load_training_checkpoint(path: str | Path) -> dict:
    """A run's checkpoint for resuming it (the dict of the module docstring); model weights alone for inference or
    fine-tuning load with :func:`blip_fast.checkpoint.load_checkpoint`."""
    payload = load_torch(path)
    missing = {"model", "optimizer", "progress", "data", "rng", "config", TRAINING_CONFIG_KEY} - set(payload)
    if missing:
        raise CheckpointError(f"{path} is not a blip-fast training checkpoint (missing {', '.join(sorted(missing))}); "
                              "to start from model weights, load them into a new run instead of resuming")
    return payload
