"""Checkpoints: original Salesforce ``.pth`` files and Hugging Face directories, read and written."""

from pathlib import Path

from .huggingface import load_hf, save_hf
from .io import CheckpointError, atomic_write, load_torch, save_torch
from .salesforce import load_salesforce, save_salesforce


def load_checkpoint(path, task=None, image_size=None):
    """A directory with ``config.json`` is read as Hugging Face, a file as Salesforce."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").exists():
        return load_hf(path, task, image_size)
    return load_salesforce(path, task, image_size)


__all__ = ["CheckpointError", "atomic_write", "load_checkpoint", "load_hf", "load_salesforce", "load_torch",
           "save_hf", "save_salesforce", "save_torch"]
