"""The next training batch copied to the GPU while the current step runs.

The trainer's batches come from the DataLoader in page-locked host memory (``ResumableBatches(pin_memory=True)``), so
their copies to the GPU run beside the host. On the step's own stream, though, a copy still runs between two steps,
and the GPU computes nothing meanwhile (~58 MB of fp32 images per ViT-B/224 batch of 96). :class:`BatchCopies` starts
each batch's copy on a side stream as soon as the batch is read, one batch before the step takes it
(``ResumableBatches.read_ahead``), so that it overlaps the step before; the step's stream waits for the copy only when
it takes the batch. The batch's tensors are then marked as used on the step's stream (``record_stream``): the caching
allocator would otherwise hand their memory to the next copy, on the side stream, while the step may still read it.

Resume stays exact: the batches' ``state_dict`` is the place as of the last batch handed out, not of the one read
ahead. On a CPU, or without read-ahead, :meth:`BatchCopies.take` copies as the batch is taken.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch


class StartedCopy(NamedTuple):
    """A batch whose copy to the device was started on the side stream, and the event that marks its end."""

    batch: object
    copied: torch.cuda.Event


class BatchCopies:
    """``start(batch)`` when a batch is read (give it to ``ResumableBatches.read_ahead``); ``take(item)`` when the
    step takes it: the batch on ``device``, after ``prepare`` (the task's host-side work, e.g. packing captions)."""

    def __init__(self, device: torch.device, prepare: Callable[[object], object]):
        self.device, self.prepare = device, prepare
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @property
    def reads_ahead(self) -> bool:
        """Whether copies can run beside the step (a CUDA device)."""
        return self.stream is not None

    def start(self, batch) -> StartedCopy:
        """Begin ``batch``'s copy on the side stream; the host goes on at once."""
        batch = self.prepare(batch)
        with torch.cuda.stream(self.stream):
            moved = batch.to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        return StartedCopy(moved, copied)

    def take(self, item):
        """The batch on the device, ready for the step's (current) stream: ``item`` is a :class:`StartedCopy`, or a
        batch still on the host, copied here on the current stream."""
        if not isinstance(item, StartedCopy):
            return self.prepare(item).to(self.device, non_blocking=True)
        current = torch.cuda.current_stream(self.device)
        current.wait_event(item.copied)
        for tensor in batch_tensors(item.batch):
            tensor.record_stream(current)
        return item.batch


def batch_tensors(batch) -> Iterator[torch.Tensor]:
    """Every tensor a batch holds: its fields', and those of its tuple fields (the captions' packing)."""
    for value in vars(batch).values():
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (tuple, list)):
            yield from (item for item in value if isinstance(item, torch.Tensor))
