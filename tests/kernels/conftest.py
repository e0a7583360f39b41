"""Where the Triton kernels run in the tests: on CUDA, or, without a GPU, in Triton's interpreter.

tests/conftest.py sets ``TRITON_INTERPRET=1`` before anything imports triton. The interpreter runs
fp32 and fp16 but cannot hold bf16, so bf16 parity is a GPU test. If triton was imported before the
variable was set, these tests skip and ``test_interpreter.py`` runs them in a fresh process instead.
"""

import pytest
import torch
from triton_interpreter import interpreter_ready


@pytest.fixture
def triton_device() -> str:
    """The device whose tensors the Triton kernels take here: ``cuda``, or ``cpu`` in the interpreter."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return "cuda"
    if not interpreter_ready():
        pytest.skip("triton was imported before TRITON_INTERPRET=1; test_interpreter.py runs them in a subprocess")
    return "cpu"
