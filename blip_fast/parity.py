"""``blip-fast parity``: every registered fast implementation against its reference, here.

The check a user runs on a new GPU, driver or torch: for each op, each fast backend that can run
on the device, each parity case (BLIP shapes) and dtype, the outputs -- and the gradients of the
differentiable inputs -- are compared with the reference on the same inputs.

Rule (flash-attention's): the fast result's error against an fp32 (fp64 on CPU) reference must be
at most ``2 *`` the error of the reference evaluated in the low dtype itself, plus a floor
that absorbs summation-order noise, relative to the largest reference value:
``err_fast <= 2 * err_lowp + floor[dtype] * max|ref|`` (:data:`blip_fast.tolerances.PARITY_FLOOR`). In fp32 the
floor is what matters. (The floor scales with the values compared: an absolute one would pass any answer to
gradients far smaller than it, zeros included.) Integer outputs (indices) must equal the reference's on the same
inputs; for them the "max abs" column counts mismatching elements.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .ops.registry import OPS, ParityCase
from .tolerances import PARITY_FLOOR

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


@dataclass
class ParityRow:
    op: str
    backend: str
    mode: str
    dtype: str
    shape: str
    what: str  # "out", "out[i]", "grad[i]", "arg[i]"
    max_abs: float
    max_rel: float
    bound: float
    passed: bool


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def _clone_args(args, dtype: torch.dtype | None, requires_grad: set[int]):
    """Copy the inputs (in-place ops mutate them), optionally casting floating tensors."""
    def copy(value, index):
        if isinstance(value, torch.Tensor):
            out = value.detach().clone()
            if dtype is not None and out.is_floating_point():
                out = out.to(dtype)
            if index in requires_grad:
                out.requires_grad_(True)
            return out
        if isinstance(value, list):
            return [copy(v, None) for v in value]
        return value

    return tuple(copy(value, i) for i, value in enumerate(args))


def _run(fn, args, kwargs, case: ParityCase):
    result = fn(*args, **kwargs)
    if case.inplace_argnums:
        outputs = [t for i in case.inplace_argnums for t in _tensors(args[i])]
    else:
        outputs = _tensors(result)
    grads = []
    differentiable = [o for o in outputs if o.requires_grad]
    if case.grad_argnums and differentiable:
        # a fixed random cotangent per output: gradients of sum(o * w) check every element
        generator = torch.Generator().manual_seed(1)
        cotangents = [torch.randn(o.shape, generator=generator).to(o.device, o.dtype) for o in differentiable]
        inputs = [args[i] for i in case.grad_argnums]
        grads = torch.autograd.grad(differentiable, inputs, cotangents, allow_unused=True)
        grads = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, inputs, strict=True)]
    return [o.detach() for o in outputs], [g.detach() for g in grads]


def _compare(fast: torch.Tensor, low: torch.Tensor, high: torch.Tensor, dtype, exact: bool):
    if exact or not fast.is_floating_point():
        # same inputs, same answer: compare with the reference at the same dtype
        mismatches = float((fast.cpu() != low.cpu()).sum())
        return mismatches, 0.0, 0.0, mismatches == 0
    high = high.double()
    err_fast = (fast.double() - high).abs().max().item() if fast.numel() else 0.0
    err_low = (low.double() - high).abs().max().item() if low.numel() else 0.0
    scale = high.abs().max().item() if high.numel() else 0.0
    bound = 2 * err_low + PARITY_FLOOR[dtype] * scale
    finite = bool(torch.isfinite(fast).all())
    return err_fast, err_fast / max(scale, 1e-30), bound, finite and err_fast <= bound


def check_case(op_name: str, backend: str, case: ParityCase, dtype: torch.dtype, device: torch.device,
               seed: int = 0) -> list[ParityRow]:
    op = OPS[op_name]
    generator = torch.Generator().manual_seed(seed)
    args, kwargs = case.make_inputs(device, dtype, generator)
    grad_set = set(case.grad_argnums)
    high_dtype = torch.float64 if device.type == "cpu" else torch.float32
    fast_out, fast_grads = _run(op.function(backend), _clone_args(args, None, grad_set), kwargs, case)
    low_out, low_grads = _run(op.reference, _clone_args(args, None, grad_set), kwargs, case)
    if case.exact:  # compared with the reference at the same dtype only
        high_out, high_grads = low_out, low_grads
    else:
        high_out, high_grads = _run(op.reference, _clone_args(args, high_dtype, grad_set), kwargs, case)
    rows = []
    pairs = [(f"out[{i}]", f, lo, hi) for i, (f, lo, hi) in enumerate(zip(fast_out, low_out, high_out, strict=True))]
    pairs += [(f"grad[{case.grad_argnums[i]}]", f, lo, hi)
              for i, (f, lo, hi) in enumerate(zip(fast_grads, low_grads, high_grads, strict=True))]
    for what, fast, low, high in pairs:
        max_abs, max_rel, bound, passed = _compare(fast, low, high, dtype, case.exact)
        rows.append(ParityRow(op_name, backend, case.mode, DTYPE_NAMES[dtype], case.shape, what, max_abs, max_rel,
                              bound, passed))
    return rows


def run_parity(device: torch.device, ops: list[str] | None = None, dtypes: list[torch.dtype] | None = None
               ) -> list[ParityRow]:
    """Every (op, fast backend available on ``device``, case, dtype) comparison. An op name that is not registered is
    a ValueError: a typo would otherwise select nothing and pass."""
    unknown = sorted(set(ops or ()) - set(OPS))
    if unknown:
        raise ValueError(f"no op named {', '.join(map(repr, unknown))}; the ops are {', '.join(sorted(OPS))}")
    rows = []
    for name, op in OPS.items():
        if ops and name not in ops:
            continue
        for backend in op.available(device):
            if backend == "reference":
                continue
            for case in op.parity_cases:
                for dtype in case.dtypes:
                    if dtypes and dtype not in dtypes:
                        continue
                    if device.type == "cpu" and dtype == torch.float16 and not _cpu_supports_half():
                        continue
                    rows.extend(check_case(name, backend, case, dtype, device))
    return rows


def _cpu_supports_half() -> bool:
    try:
        torch.ones(2, 2, dtype=torch.float16) @ torch.ones(2, 2, dtype=torch.float16)
        return True
    except RuntimeError:
        return False


def format_table(rows: list[ParityRow]) -> str:
    header = ("op", "backend", "mode", "dtype", "shape", "what", "max abs", "max rel", "bound", "result")
    body = [(r.op, r.backend, r.mode, r.dtype, r.shape, r.what, f"{r.max_abs:.2e}", f"{r.max_rel:.2e}",
             f"{r.bound:.2e}", "pass" if r.passed else "FAIL") for r in rows]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *body, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)) for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
