"""Reading and writing checkpoint files safely.

Writes go to a temporary file in the same folder, are flushed to disk, then renamed over the
target (``os.replace`` is atomic on POSIX): a crash mid-write leaves the old checkpoint intact. The
file gets the mode a plain ``open`` would give it (the replaced file's, else 0o666 less the umask),
not ``mkstemp``'s owner-only 0o600.
Reads turn the many ways a file can be wrong (missing, truncated, not a torch file, pickled
code) into one :class:`CheckpointError` that names the file and the problem.
"""

from __future__ import annotations

import os
import pickle
import re
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not fit the model it is loaded into."""


def current_umask() -> int:
    """The process umask. Linux shows it in /proc/self/status; elsewhere it can only be read by setting
    it, so it is set back at once (another thread creating a file in between would get mode 0o666)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode(path: str | Path) -> int:
    """The permission bits a write to ``path`` should leave: those of the file it replaces, else what
    ``open(path, "w")`` would create (0o666 less the umask)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~current_umask()


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(temp_path)`` and move the result to ``path`` only once it is complete. The file gets
    :func:`new_file_mode`'s mode (``mkstemp`` creates it owner-only)."""
    path = Path(path)
    if path.is_dir():  # os.replace would fail after the whole write, naming the temporary file
        raise IsADirectoryError(f"cannot write {path}: it is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = new_file_mode(path)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(temp)
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def save_torch(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through :func:`atomic_write`. A failed write (a full disk, a quota) is an OSError, as from any
    other file write: torch.save reports it as a RuntimeError of its zip writer."""
    def write(temp: str) -> None:
        try:
            torch.save(obj, temp)
        except RuntimeError as error:
            raise OSError(f"writing {path} failed: {str(error).splitlines()[0]}") from error

    return atomic_write(path, write)


def load_torch(path: str | Path) -> Any:
    """``torch.load`` of tensors and plain containers only (no pickled code), on the CPU."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; a Hugging Face checkpoint directory needs a config.json")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load fails on garbage with many types (IndexError, KeyError, ...)
        cause = error
        if isinstance(error, pickle.UnpicklingError) and isinstance(error.__context__, pickle.UnpicklingError):
            # torch wraps what its weights-only unpickler refused in advice to load with weights_only=False, which
            # would run code from the file; the unpickler's own error, the context, says what was refused
            cause = error.__context__
        reason = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        refused = re.search(r"GLOBAL (\S+)", reason)
        if refused:
            reason = reason.split(". ")[0].rstrip(".")  # the next sentences advise allow-listing the global
            raise CheckpointError(
                f"cannot read checkpoint {path}: it holds Python objects other than tensors and plain containers "
                f"(here {refused.group(1)}), which blip-fast does not unpickle, for safety: unpickling them can run "
                f"code the file names. torch says: {reason}. Tensors in plain containers, such as "
                "{'model': model.state_dict()}, load."
            ) from None
        raise CheckpointError(
            f"cannot read checkpoint {path}: {reason}. The file may be truncated (an interrupted download "
            "or copy) or not a PyTorch checkpoint."
        ) from None
