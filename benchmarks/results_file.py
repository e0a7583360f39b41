"""Results files of the benchmark scripts beside this one (format: docs/results-format.md).

Every script writes the same header -- suite, device, library versions, the commit measured (and the
git tree of the files measured, which names that commit even where the checkout's HEAD is stale), the
date and the command -- then its records; this module is the one place that header is made. It is part
of the benchmarks, not of the ``blip_fast`` package: the scripts import it as a sibling module
(``python benchmarks/bench_step.py`` puts ``benchmarks/`` on ``sys.path``; the tests put it there too).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from blip_fast.checkpoint.io import atomic_write


def git_commit(where: str | Path = Path(__file__).parent) -> str:
    """The short hash of the checkout ``where`` is in, with ``-dirty`` when tracked files differ from that
    commit (the code measured is then not exactly it); "unknown" outside a checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=where).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = head and git("status", "--porcelain", "--untracked-files=no")
    except OSError:
        return "unknown"
    if not head:
        return "unknown"
    return head + ("-dirty" if dirty else "")


def git_tree(where: str | Path = Path(__file__).parent) -> str:
    """The git tree hash of the checkout's files as they are (tracked and untracked-but-not-ignored, in a throwaway
    index: the checkout's own index is left alone), or "unknown" outside a checkout. It equals
    ``git rev-parse COMMIT^{tree}`` of the commit whose files were measured, also where HEAD is stale: the device
    tool's copy of a checkout keeps the session's first HEAD and sees later commits as uncommitted changes."""
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, cwd=where)
    if root.returncode != 0:
        return "unknown"
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "GIT_INDEX_FILE": str(Path(scratch) / "index")}
        for args in (["add", "-A", "."], ["write-tree"]):
            done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=root.stdout.strip(), env=env)
            if done.returncode != 0:
                return "unknown"
    return done.stdout.strip()


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def command_line(suite: str, argv: list[str] | None) -> str:
    """The command that made a results file, as ``python benchmarks/bench_SUITE.py ARGS`` run from the repository
    root (ARGS: what the script's ``main`` got, or the command line when it runs as a script)."""
    return " ".join(["python", f"benchmarks/bench_{suite}.py", *(sys.argv[1:] if argv is None else argv)])


def gpu_timing_unavailable(suite: str) -> str | None:
    """Why a benchmark timed on the GPU with ``triton.testing.do_bench`` cannot run here, or None."""
    if not torch.cuda.is_available():
        return f"bench_{suite}.py: needs a CUDA device (timings are GPU-only); none found."
    if triton_version() is None:
        return f"bench_{suite}.py: needs triton (pip install triton==3.6.0) for do_bench."
    return None


def benchmark_arguments(doc: str) -> argparse.ArgumentParser:
    """A benchmark script's argument parser: its docstring's first paragraph, and ``--json PATH``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="write the results file (format: docs/results-format.md) here")
    return parser


def run_gpu_benchmark(suite: str, kind: str, argv: list[str] | None, json_path: str | None,
                      run: Callable[[], list[dict]], print_table: Callable[[list[dict]], None]) -> int:
    """The end of a GPU microbenchmark's ``main``: say why it cannot run here (exit 1), or run it, print its table
    and write its results file (``kind`` is the file's suite name in docs/results-format.md: kernels, losses ...)."""
    unavailable = gpu_timing_unavailable(suite)
    if unavailable:
        print(unavailable, file=sys.stderr)
        return 1
    records = run()
    print_table(records)
    if json_path:
        write_results(json_path, kind, device_name("cuda"), command_line(suite, argv), records)
        print(f"wrote {json_path}")
    return 0


def time_and_peak(case: str, impl: str, call: Callable[[], object]) -> list[dict]:
    """Records of one GPU call: ``us``, the median of ``triton.testing.do_bench``, and ``peak_gib``, the memory one
    call allocates beyond what was allocated before it. Run ``call`` once first (compiles, caches)."""
    import triton.testing

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    median_ms = triton.testing.do_bench(call, return_mode="median")
    return [{"case": case, "impl": impl, "metric": "us", "value": round(median_ms * 1e3, 1)},
            {"case": case, "impl": impl, "metric": "peak_gib", "value": round(peak, 3)}]


def print_time_and_peak_table(records: list[dict], impl_width: int = 10) -> None:
    """The table of :func:`time_and_peak` records: time, peak memory, and speed against the ``reference`` impl."""
    print(f"{'case':<30} {'impl':<{impl_width}} {'us':>10} {'peak GiB':>9} {'vs reference':>13}")
    times = {(r["case"], r["impl"]): r["value"] for r in records if r["metric"] == "us"}
    peaks = {(r["case"], r["impl"]): r["value"] for r in records if r["metric"] == "peak_gib"}
    for (case, impl), us in times.items():
        speedup = times[(case, "reference")] / us
        print(f"{case:<30} {impl:<{impl_width}} {us:>10.1f} {peaks[(case, impl)]:>9.3f} {speedup:>12.2f}x")


def device_name(device: torch.device | str | None = None) -> str:
    """``torch.cuda.get_device_name()`` for a CUDA device, else "cpu"."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type != "cuda":
        return "cpu"
    return torch.cuda.get_device_name(device) if torch.cuda.is_available() else "cpu"


def write_results(path: str | Path, suite: str, device: str, command: str, records: list[dict], **extra) -> Path:
    """Write one results file; ``extra`` adds fields to the header (e.g. ``dali``, ``threads``)."""
    result = {"suite": suite, "device": device, "torch": torch.__version__, "triton": triton_version(),
              "git": git_commit(), "tree": git_tree(), "date": datetime.date.today().isoformat(), "command": command,
              **extra, "records": records}
    text = json.dumps(result, indent=1) + "\n"
    # a write cut short (a full disk, a killed run) must not leave a results file half-written over the last one
    return atomic_write(path, lambda temp: Path(temp).write_text(text))
