"""Every Triton kernel registered as an op's backend against that op's reference at BLIP's shapes, on the GPU: each
parity case of the op (blip_fast/ops, what ``blip-fast parity`` runs), in fp32, fp16 and bf16 (the interpreter
cannot hold bf16), values and the gradients the case names, by the bound of docs/correctness.md. A kernel registered
later is covered without a test of its own."""

import pytest
import torch

import blip_fast.ops  # noqa: F401  (defines every op)
from blip_fast.ops.registry import OPS
from blip_fast.parity import check_case

CASES = [(name, case) for name, op in sorted(OPS.items()) if "triton" in op.impls for case in op.parity_cases]


def test_every_triton_backend_has_parity_cases():
    with_kernels = {name for name, op in OPS.items() if "triton" in op.impls}
    assert with_kernels and with_kernels == {name for name, _ in CASES}


@pytest.mark.gpu
@pytest.mark.parametrize("op_name, case", CASES, ids=[f"{name}-{case.mode}" for name, case in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_matches_reference_at_blip_shapes_on_gpu(op_name, case, dtype):
    failed = [row for row in check_case(op_name, "triton", case, dtype, torch.device("cuda")) if not row.passed]
    assert not failed, failed
