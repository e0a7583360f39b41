"""What a user sees of a run: a progress line or bar, metrics.jsonl, TensorBoard events, the summary.

Only rank 0 writes. ``metrics.jsonl`` gets one JSON object per logged step (``step``, ``epoch``,
``lr``, ``alpha``, ``temp``, ``loss``, ``loss_<name>`` per loss of the task, ``samples_per_s``,
``elapsed_s``, ``skipped``; ``skipped_steps`` with ``train.nonfinite: skip``) and one per event: an
evaluation (``kind: "eval"``), a resume (``kind: "resume"``: records of later steps before it come from
the run it continues), a divergence (``kind: "diverged"``). A resumed run appends to the same file. A
loss that is not a number (no step of the window counted, or NaN) is written as ``null``: the file is
strict JSON, one object per line.
TensorBoard gets the same scalars when the ``tensorboard`` package is installed.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

log = logging.getLogger("blip_fast.train")


def _format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _json_value(value):
    """JSON has no NaN or infinity (``json.dumps`` would write the bare ``NaN`` other readers refuse): null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _number(value) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"


class RunLog:
    """JSONL + TensorBoard + console for one rank-0 process (``enabled=False`` elsewhere: every call is a no-op)."""

    def __init__(self, out: str | Path, total_steps: int, enabled: bool = True, tensorboard: bool = True,
                 printer=print):
        self.enabled, self.total_steps, self.printer = enabled, total_steps, printer
        self.writer = None
        self.jsonl = None
        self._bar = None
        if not enabled:
            return
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("train.tensorboard: the tensorboard package is not installed; metrics go to "
                            "metrics.jsonl only (pip install tensorboard)")
            else:
                self.writer = SummaryWriter(str(out / "tensorboard"))
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True)

    def start(self, step: int) -> None:
        self._started, self._start_step = time.perf_counter(), step
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def step(self, record: dict) -> None:
        """Log one step's metrics (``record`` holds at least ``step`` and ``samples_per_s``)."""
        if not self.enabled:
            return
        self._write(record)
        done = record["step"] - self._start_step
        eta = (time.perf_counter() - self._started) / max(1, done) * (self.total_steps - record["step"])
        losses = "  ".join(f"{k[5:]} {_number(value)}" for k, value in record.items() if k.startswith("loss_"))
        text = (f"loss {_number(record['loss'])} ({losses})  lr {record['lr']:.2e}  "
                f"{record['samples_per_s']:.0f} samples/s")
        if record.get("skipped_steps"):
            text += f"  {record['skipped_steps']} non-finite steps skipped"
        if self._bar is not None:
            self._bar.update(record["step"] - self._bar.n)
            self._bar.set_postfix_str(text)
        else:
            self.printer(f"step {record['step']}/{self.total_steps} (epoch {record['epoch']})  {text}  "
                         f"ETA {_format_duration(eta)}")

    def event(self, record: dict, message: str) -> None:
        """A non-step record (an evaluation, a checkpoint) and its console line."""
        if not self.enabled:
            return
        self._write(record)
        if self._bar is not None:
            self._bar.write(message)
        else:
            self.printer(message)

    def _write(self, record: dict) -> None:
        record = {k: _json_value(v) for k, v in record.items()}
        self.jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        if self.writer is not None:
            prefix = record.get("kind", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "epoch"):
                    self.writer.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self.writer is not None:
            self.writer.close()
        self.jsonl.close()
