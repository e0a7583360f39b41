"""The optional native extension ``blip_fast._C`` (built from ``csrc/`` by setup.py or CMake).

The package must import and work without it, so a failed import is recorded, not raised:
``HAS_NATIVE`` says whether it loaded and ``IMPORT_ERROR`` keeps the reason, for diagnostics
(why the ``cuda`` backend of an op is unavailable).
"""

from __future__ import annotations

import importlib

import torch  # noqa: F401  (loads libtorch, whose symbols the extension resolves at import)

try:
    # import_module rather than `from blip_fast import _C`: while blip_fast/__init__ is still running
    # the latter reports a missing module as a "circular import".
    _C = importlib.import_module("blip_fast._C")
except (ImportError, OSError) as exc:  # not built, or built against another torch
    _C = None
    IMPORT_ERROR: str | None = f"{type(exc).__name__}: {exc}"
else:
    IMPORT_ERROR = None

HAS_NATIVE = _C is not None
