"""Runs the Triton kernel tests in a fresh interpreter when this process cannot.

TRITON_INTERPRET is read when triton's own @jit functions are decorated, i.e. when triton is first
imported; if anything imported it before tests/conftest.py set the variable, the interpreter cannot
run in this process, so a subprocess with the variable set from the start runs the ``test_triton_``
tests of this directory.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from triton_interpreter import interpreter_ready


def test_interpreter_subprocess():
    pytest.importorskip("triton")
    if torch.cuda.is_available() or interpreter_ready():
        pytest.skip("the Triton tests run in this process")
    here = Path(__file__).resolve().parent
    command = [sys.executable, "-m", "pytest", str(here), "-q", "-p", "no:cacheprovider", "-m", "not gpu",
               "-k", "test_triton_"]
    result = subprocess.run(command, cwd=here.parents[1], env={**os.environ, "TRITON_INTERPRET": "1"},
                            capture_output=True, text=True)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    assert "passed" in summary and "skipped" not in summary, summary
