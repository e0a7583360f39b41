"""``python benchmarks/report.py``: every results file under benchmarks/results/ in one markdown report with plots.

    python benchmarks/report.py                              # -> benchmarks/results/REPORT.md (+ PNG plots)
    python benchmarks/report.py --results DIR --out DIR/REPORT.md

For each results file (format: docs/results-format.md) the report lists where and when it was
measured and a table of its records (case x impl x metric). Plots (with matplotlib installed):

* ``step``: samples/s and peak memory by impl (the training-step techniques);
* ``data``: images/s by loader (``fast`` = DALI on the GPU, ``dali_cpu``, ``pil``) and case;
* ``kernels`` and any other suite with ``us`` records: speed-up of ``fast`` over each other impl,
  by case (shape).

Files that do not follow the format are listed as skipped with the reason, never dropped silently.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REQUIRED = ("suite", "device", "torch", "git", "date", "command", "records")


def load_results(folder: Path) -> tuple[list[tuple[Path, dict]], list[tuple[Path, str]]]:
    loaded, skipped = [], []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            skipped.append((path, f"not readable JSON ({error})"))
            continue
        missing = [key for key in REQUIRED if key not in data] if isinstance(data, dict) else list(REQUIRED)
        if missing:
            skipped.append((path, f"missing {', '.join(missing)}"))
            continue
        bad = [r for r in data["records"] if not {"case", "impl", "metric", "value"} <= set(r)]
        if bad:
            skipped.append((path, f"{len(bad)} records without case/impl/metric/value"))
            continue
        loaded.append((path, data))
    return loaded, skipped


def _value(record: dict) -> str:
    value = record["value"]
    if record["metric"] == "mfu":
        # model MFU says whose FLOP count it used: the original's, or our reference path's (~16% fewer)
        source = f", FLOPs of {record['flops_from']}" if "flops_from" in record else ""
        return f"{value:.1%} ({record.get('flops', '?')}{source})"
    return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.3g}"


def table(records: list[dict]) -> list[str]:
    lines = ["| case | impl | metric | value |", "|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['case']} | {r['impl']} | {r['metric']} | {_value(r)} |")
    return lines


def _bar_plot(path: Path, title: str, groups: dict[str, dict[str, float]], ylabel: str) -> bool:
    """Grouped bars: ``groups[case][impl] = value``. Returns False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cases = list(groups)
    impls = sorted({impl for values in groups.values() for impl in values})
    width = 0.8 / max(1, len(impls))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(cases) + 2), 3.6))
    for k, impl in enumerate(impls):
        xs = [i + k * width for i in range(len(cases))]
        ax.bar(xs, [groups[c].get(impl, 0.0) for c in cases], width, label=impl)
    ax.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(cases))], cases, rotation=15, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plots_for(path: Path, data: dict, out_dir: Path) -> list[str]:
    """Plot files written for one results file (names relative to the report)."""
    by_metric: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in data["records"]:
        by_metric[r["metric"]][r["case"]][r["impl"]] = r["value"]
    written = []
    wanted = {"samples_per_s": "samples/s", "images_per_s": "images/s", "peak_gib": "peak GiB"}
    for metric, label in wanted.items():
        if metric in by_metric:
            name = f"{path.stem}-{metric}.png"
            if _bar_plot(out_dir / name, f"{data['suite']}: {label} ({data['device']})", by_metric[metric], label):
                written.append(name)
    if "us" in by_metric:
        speedups = {case: {impl: values[impl] / values["fast"] for impl in values if impl != "fast"}
                    for case, values in by_metric["us"].items() if values.get("fast")}
        name = f"{path.stem}-speedup.png"
        if speedups and _bar_plot(out_dir / name, f"{data['suite']}: speed-up of fast over ({data['device']})",
                                  speedups, "x faster"):
            written.append(name)
    return written


def build_report(folder: Path, out: Path) -> str:
    loaded, skipped = load_results(folder)
    lines = ["# blip_fast benchmark report", "",
             f"Generated by `python benchmarks/report.py` from {len(loaded)} results file(s) in `{folder.name}/`. "
             "Every number below was measured by the command named with it; see docs/results-format.md for the "
             "format and timing rules.", ""]
    if not loaded:
        lines += ["No results files yet.", ""]
    plots_missing = False
    for path, data in loaded:
        lines += [f"## {data['suite']}: {path.name}", "",
                  f"- device: {data['device']}; torch {data['torch']}; triton {data.get('triton')}; "
                  f"commit {data['git']}; date {data['date']}",
                  f"- command: `{data['command']}`"]
        if "tree" in data:  # a run on an uncommitted tree says which commit holds the code it measured
            lines.append(f"- tree: {data['tree']}")
        lines += [""] + table(data["records"]) + [""]
        plots = plots_for(path, data, out.parent)
        if not plots and any(r["metric"] in ("samples_per_s", "images_per_s", "us") for r in data["records"]):
            plots_missing = True
        lines += [f"![{name}]({name})" for name in plots] + ([""] if plots else [])
    if plots_missing:
        lines += ["(plots need matplotlib: pip install matplotlib)", ""]
    if skipped:
        lines += ["## Skipped files", ""] + [f"- {p.name}: {reason}" for p, reason in skipped] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/report.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of results files")
    parser.add_argument("--out", type=Path, help="report file (default: RESULTS/REPORT.md)")
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        print(f"error: {args.results} is not a folder of results files", file=sys.stderr)
        return 2
    out = args.out or args.results / "REPORT.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(build_report(args.results, out))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
