"""The installed package is self-contained: ``blip_fast`` (with ``kernels/``, shipped as ``blip_fast.kernels``) needs
nothing of the source checkout around it. The benchmarks and their results-file module live in ``benchmarks/`` and
run as ``python benchmarks/bench_SUITE.py``; the package neither imports them nor finds them by path."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from blip_fast.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_SOURCES = ("blip_fast", "kernels")  # setup.py: package_dir maps blip_fast.kernels to kernels/
# what reaching outside looks like in source: a path to the checkout's other folders ("benchmarks", "tests" as a
# string or a path part), loading a file as a module, putting a folder on sys.path, or the benchmarks' own module
REACHING_OUT = re.compile(r"""["'](benchmarks|tests)["'/]|spec_from_file_location|sys\.path\b|"""
                          r"""\b(bench_results|results_file)\b""")


def test_no_package_source_names_a_folder_or_module_outside_the_package():
    sources = [path for folder in PACKAGE_SOURCES for path in sorted((ROOT / folder).rglob("*.py"))]
    assert len(sources) > 50  # the scan saw the package, not an empty folder
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}" for path in sources
             for number, line in enumerate(path.read_text().splitlines(), 1) if REACHING_OUT.search(line)]
    assert not found, "the package reaches outside itself:\n" + "\n".join(found)


def test_the_scan_recognises_how_the_package_once_reached_the_benchmarks():
    """What blip_fast/cli.py held before the benchmarks left the package: each line is one the scan must flag."""
    for line in ('BENCHMARKS_DIR = Path(__file__).resolve().parent.parent / "benchmarks"',
                 'spec = importlib.util.spec_from_file_location(f"blip_fast_bench_{args.suite}", script)',
                 "from blip_fast." "bench_results import command_line, write_results",  # split: keeps greps quiet
                 "from .bench_results import write_results"):
        assert REACHING_OUT.search(line), line
    assert not REACHING_OUT.search('CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"')


def test_importing_every_module_loads_nothing_from_the_checkout_outside_the_package(tmp_path):
    """Every blip_fast module imported in a fresh interpreter started outside the checkout (nothing of it on
    sys.path but the installed package): the modules it loads from the checkout all lie in the package's sources."""
    code = ("import importlib, pkgutil, sys\n"
            "import blip_fast\n"
            "names = [m.name for m in pkgutil.walk_packages(blip_fast.__path__, 'blip_fast.')]\n"
            "for name in names:\n"
            "    importlib.import_module(name)\n"
            "print(len(names))\n"
            "for module in list(sys.modules.values()):\n"
            "    print(getattr(module, '__file__', None) or '')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    count, *files = done.stdout.splitlines()
    assert int(count) > 30
    # installed libraries may live in the checkout too (a virtual environment in .venv/): not the checkout's code;
    # and a few modules torch makes name a bare file (torch.ops: "_ops.py")
    files = [Path(f).resolve() for f in files if Path(f).is_absolute()]
    installed = {"site-packages", "dist-packages"}
    from_checkout = {f for f in files if f.is_relative_to(ROOT) and not installed & set(f.parts)}
    inside = {f for f in from_checkout if f.relative_to(ROOT).parts[0] in PACKAGE_SOURCES}
    assert inside, "blip_fast was not imported from this checkout"
    assert from_checkout == inside, sorted(str(f) for f in from_checkout - inside)


def test_the_command_line_has_no_bench_command(capsys):
    """The benchmarks run as scripts of the checkout (python benchmarks/bench_SUITE.py), not as a subcommand."""
    commands = next(action.choices for action in build_parser()._actions if action.dest == "command")
    assert {"pretrain", "caption", "parity"} <= set(commands) and "bench" not in commands
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "step"])
    assert exit_info.value.code == 2 and "invalid choice: 'bench'" in capsys.readouterr().err
