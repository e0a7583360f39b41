"""Every Triton kernel compiles for the H100 (sm_90) in bf16, fp16 and fp32, on any machine with triton (the packed
attention's, blocked and single-tile, in each causal x dropout variant in bf16, the ITC kernels with and without
image ids, the decoding step's split and combine, the sublayer output's LayerNorm).

CI runs the kernels in Triton's interpreter, which cannot hold bf16; compiling them ahead of time with the
ptxas Triton ships catches type and lowering errors of every dtype without a GPU. It runs in a subprocess:
under TRITON_INTERPRET=1 (this process) ``@triton.jit`` gives interpreter functions, which do not compile.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from compile_for_gpu import KERNEL_MODULES, SM90_SHARED_LIMIT

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(not all(module.HAS_TRITON for module in KERNEL_MODULES),
                    reason="triton is not installed")
def test_kernels_compile_for_sm90_in_every_dtype():
    result = subprocess.run([sys.executable, str(HERE / "compile_for_gpu.py"), "90"], cwd=HERE.parents[1],
                            env={**os.environ, "TRITON_INTERPRET": "0"}, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    lines = result.stdout.strip().splitlines()
    # per dtype: hard negatives, the LM loss twice, the packed attention's 4 blocked and 2 single-tile kernels, the
    # ITC forward and gradients twice each, the decoding step's split and combine, the sublayer output's forward and
    # backward; in bf16 5 attention kernels in 3 more causal x dropout variants and the 2 single-tile ones per
    # sequence; the ITC combine and the sublayer output's dropout mask once
    assert len(lines) == 3 * (3 + 6 + 4 + 2 + 2) + 3 * 5 + 2 + 1 + 1 and all("sm_90 cubin" in line for line in lines), \
        result.stdout
    # and each fits an SM's shared memory, or it would compile and fail at launch
    too_large = [line for line in lines if int(line.rsplit("shared ", 1)[1]) > SM90_SHARED_LIMIT]
    assert not too_large, too_large
