"""Implementation registry for the hot operations of BLIP.

Every hot op (attention in its three modes, over packed sequences and in decoding steps, the sublayer output, the
ITC loss, the LM loss, hard-negative sampling, the momentum update, the queue update) has one public entry in
:mod:`blip_fast.ops`. Behind the
entry sits an :class:`Op`: a pure-PyTorch ``reference`` that follows the paper and the original
Salesforce code, plus any number of fast implementations registered by backend name:

* ``torch``   -- torch's own fused ops (SDPA, ``_foreach`` kernels); runs everywhere.
* ``triton``  -- our Triton kernels (``blip_fast.kernels``); CUDA tensors only.
* ``cuda``    -- our CUDA C++ kernels (``csrc/``, the optional ``blip_fast._C`` extension).

Which one runs is chosen per call from the tensors' device and one switch: the environment
variable ``BLIP_FAST_IMPL`` (``auto`` | ``reference`` | ``torch`` | ``triton`` | ``cuda``, optionally
followed by per-op entries: ``auto,lm_loss=reference``), which :func:`set_impl` overrides (tests,
``train.impl``). ``auto`` takes the first available of ``cuda``, ``triton``, ``torch``,
``reference``; naming a backend prefers it and falls back in the same order where an op has no
such implementation. The choice for each (op, device) is logged once. An implementation registered with
``auto=False`` runs only where it is named: ``auto`` passes it over until a GPU measurement shows it faster.

A fast implementation also brings its parity cases (:class:`ParityCase`): inputs at BLIP shapes on
which it must match the reference. ``blip-fast parity`` runs them all (:mod:`blip_fast.parity`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger("blip_fast.ops")

BACKENDS = ("reference", "torch", "triton", "cuda")
CHOICES = ("auto",) + BACKENDS
# Preference of ``auto``: our own kernels first, then torch's fused ops, then the reference.
AUTO_ORDER = ("cuda", "triton", "torch", "reference")

_override: str | None = None


def _parse(spec: str, source: str) -> tuple[str, dict[str, str]]:
    """``"auto"`` or ``"auto,lm_loss=reference"`` -> (the default backend, {op: backend}), validated."""
    default, per_op = "auto", {}
    for part in spec.lower().split(","):
        name, _, choice = part.rpartition("=")
        choice, name = choice.strip(), name.strip()
        if choice not in CHOICES or (not name and "=" in part):
            raise ValueError(f"{source} must be one of {', '.join(CHOICES)}, or such a default followed by "
                             f"op=backend entries (e.g. auto,lm_loss=reference); got {spec!r}")
        if not name:
            default = choice
        elif name not in OPS:
            raise ValueError(f"{source}: no op named {name!r}; the ops are {', '.join(sorted(OPS))}")
        else:
            per_op[name] = choice
    return default, per_op


def validate_impl(spec: str, source: str = "impl") -> str:
    """Raise ValueError unless ``spec`` is a valid backend choice; returns it normalised (configs call this)."""
    import blip_fast.ops  # noqa: F401  (defines every op, so that op names can be checked)

    _parse(spec, source)
    return spec.strip().lower()


def requested_impl(op: str | None = None) -> str:
    """The backend asked for ``op`` (or for every op without one of its own): :func:`set_impl` if called, else
    ``$BLIP_FAST_IMPL``, else auto."""
    if _override is not None:
        spec, source = _override, "impl"
    else:
        spec, source = os.environ.get("BLIP_FAST_IMPL", "auto"), "BLIP_FAST_IMPL"
    default, per_op = _parse(spec, source)
    return per_op.get(op, default)


def set_impl(choice: str | None) -> None:
    """Select the backends (``None`` returns to ``$BLIP_FAST_IMPL``): a name for every op, optionally followed
    by ``op=backend`` entries for single ops, e.g. ``"auto,lm_loss=reference"``."""
    global _override
    if choice is not None:
        _parse(choice, "impl")
    _override = choice
    _logged.clear()


class impl_scope:
    """Context manager: ``with impl_scope("reference"): ...`` runs a block on one backend."""

    def __init__(self, choice: str):
        _parse(choice, "impl")
        self.choice = choice

    def __enter__(self):
        self.previous = _override
        set_impl(self.choice)
        return self

    def __exit__(self, *exc):
        set_impl(self.previous)
        return False


@dataclass
class ParityCase:
    """One input set on which a fast implementation must match the reference.

    ``make_inputs(device, dtype, generator)`` returns ``(args, kwargs)``. ``grad_argnums`` lists
    the positional arguments whose gradients are compared as well (empty for ops without
    gradients); ``inplace_argnums`` the arguments an in-place op writes, compared instead of
    its (None) result.
    """

    mode: str
    shape: str
    make_inputs: Callable[[torch.device, torch.dtype, torch.Generator], tuple[tuple, dict]]
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.float16, torch.bfloat16)
    grad_argnums: Sequence[int] = ()
    exact: bool = False  # integer outputs (indices): compare for equality
    inplace_argnums: Sequence[int] = ()  # in-place ops: compare these arguments after the call


@dataclass
class Implementation:
    backend: str
    fn: Callable[..., Any]
    devices: tuple[str, ...]  # device types it runs on ("cpu", "cuda")
    is_available: Callable[[], bool] = lambda: True
    dtypes: tuple[torch.dtype, ...] | None = None  # input dtypes it accepts (None: any)
    auto: bool = True  # whether ``auto`` may pick it (False: only when named)


@dataclass
class Op:
    """One hot operation: its reference, its fast implementations and its parity cases."""

    name: str
    reference: Callable[..., Any]
    impls: dict[str, Implementation] = field(default_factory=dict)
    parity_cases: list[ParityCase] = field(default_factory=list)

    def register(
        self,
        backend: str,
        fn: Callable[..., Any],
        devices: Sequence[str],
        is_available: Callable[[], bool] = lambda: True,
        dtypes: Sequence[torch.dtype] | None = None,
        auto: bool = True,
    ) -> None:
        if backend not in BACKENDS or backend == "reference":
            raise ValueError(f"cannot register backend {backend!r} for {self.name}")
        self.impls[backend] = Implementation(backend, fn, tuple(devices), is_available,
                                             None if dtypes is None else tuple(dtypes), auto)

    def register_triton(self, fn: Callable[..., Any], has_triton: bool,
                        dtypes: Sequence[torch.dtype] | None = None, auto: bool = True) -> None:
        """A Triton kernel of ``blip_fast.kernels``: CUDA tensors, where triton is installed and a GPU is present."""
        self.register("triton", fn, devices=("cuda",), is_available=lambda: has_triton and torch.cuda.is_available(),
                      dtypes=dtypes, auto=auto)

    def available(self, device: torch.device, dtype: torch.dtype | None = None) -> list[str]:
        """Backends that can run on ``device`` (for inputs of ``dtype``, when given), reference last."""
        names = [
            b
            for b in AUTO_ORDER[:-1]
            if b in self.impls and device.type in self.impls[b].devices and self.impls[b].is_available()
            and (dtype is None or self.impls[b].dtypes is None or dtype in self.impls[b].dtypes)
        ]
        return names + ["reference"]

    def select(self, device: torch.device, dtype: torch.dtype | None = None) -> str:
        choice = requested_impl(self.name)
        usable = self.available(device, dtype)
        if choice == "reference":
            picked = "reference"
        elif choice != "auto" and choice in usable:
            picked = choice
        else:
            picked = next(b for b in usable if b == "reference" or self.impls[b].auto)
        key = (self.name, device.type, choice)
        # Dynamo cannot trace a logger call (it would break a fullgraph compile), so only eager calls
        # log; tracing picks the same way. is_compiling() comes first so that tracing never reads
        # _logged: a guard on it would recompile every block after the next eager first use of an op.
        if not torch.compiler.is_compiling() and key not in _logged:
            _logged.add(key)
            log.info("blip_fast op %s on %s: %s (requested %s)", self.name, device.type, picked, choice)
        return picked

    def function(self, backend: str) -> Callable[..., Any]:
        return self.reference if backend == "reference" else self.impls[backend].fn

    def __call__(self, *args, **kwargs):
        first = _first_tensor(args, kwargs)
        device = first.device if first is not None else torch.device("cpu")
        return self.function(self.select(device, first.dtype if first is not None else None))(*args, **kwargs)


_logged: set[tuple[str, str, str]] = set()
OPS: dict[str, Op] = {}


def define_op(name: str, reference: Callable[..., Any]) -> Op:
    if name in OPS:
        raise ValueError(f"op {name!r} is defined twice")
    op = Op(name, reference)
    OPS[name] = op
    return op


def _first_tensor(args, kwargs) -> torch.Tensor | None:
    """The first tensor argument (or first element of a tensor list): its device and dtype pick the backend."""
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
            return value[0]
    return None
