"""Where the Triton kernel tests run without a GPU: in this process, or else in a fresh one.

TRITON_INTERPRET is read when triton's own @jit functions are decorated, i.e. when triton is first
imported; tests/conftest.py sets it before anything imports triton, so normally the interpreter runs the
``test_triton_`` tests of this directory right here, and this test checks that it really does (a kernel
launched here gives the reference's answer). If triton was imported earlier, those tests skip
themselves, and this one runs them in a subprocess with the variable set from the start.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from triton_interpreter import interpreter_ready

from blip_fast.kernels import lm_loss


def test_triton_kernels_run_without_a_gpu():
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the Triton tests run on it")
    if interpreter_ready():
        hidden, weight, targets = torch.randn(5, 8), torch.randn(11, 8), torch.tensor([3, -100, 0, 10, 7])
        loss = lm_loss.linear_cross_entropy_mean(hidden, weight, None, targets, 0.1, compute_grads=False)[0]
        torch.testing.assert_close(loss, lm_loss.lm_loss_ref(hidden, weight, None, targets, 0.1))
        return
    here = Path(__file__).resolve().parent
    command = [sys.executable, "-m", "pytest", str(here), "-q", "-p", "no:cacheprovider", "-m", "not gpu",
               "-k", "test_triton_ and not test_triton_kernels_run_without_a_gpu"]
    result = subprocess.run(command, cwd=here.parents[1], env={**os.environ, "TRITON_INTERPRET": "1"},
                            capture_output=True, text=True)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    assert "passed" in summary and "skipped" not in summary, summary
