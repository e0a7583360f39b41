"""How close a result must be to its reference, per dtype: the tables ``blip-fast parity`` and the tests share.

Both bound errors relative to the largest reference value, ``max|x - ref| <= tol * max|ref|``: an absolute bound
would pass any answer to values far smaller than it (small gradients, zeros included).

* :data:`PARITY_FLOOR` -- flash-attention's rule for a fast kernel in a low dtype: its error against an fp32
  (fp64 on CPU) reference may be at most twice the error of the reference evaluated in that dtype itself, plus
  this floor for summation order, ``err <= 2 * err_lowp + PARITY_FLOOR[dtype] * max|ref|``. In fp32 and fp64 the
  floor is what matters. (:mod:`blip_fast.parity`; tests/tensor_checks.py for the half-precision kernel tests.)
* :data:`RTOL` -- one computation against another of the same math that may only sum in another order (packed
  against padded captions, joint against separate text passes, ours against ``transformers``, compiled against
  eager), or an fp32 kernel against the fp64 truth: ``err <= RTOL[dtype] * max|ref|``.

A test whose bound is deliberately tighter or looser keeps it beside its own reasons.
"""

import torch

PARITY_FLOOR = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
