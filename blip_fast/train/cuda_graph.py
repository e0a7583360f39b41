"""The whole optimizer step replayed as one CUDA graph (``train.cuda_graph``).

Why: at ViT-B/16 224 px the compiled bf16 step launches thousands of small kernels from Python
(compiled blocks, autograd, AdamW), and the GPU waits on the host between them. Replaying a captured
graph launches them all at once, which nearly doubles the step on an H100 (docs/benchmarks.md has the
measurements and their results files).

What capture needs, and how this module gets it:

- the step reads nothing back to the host (``optimizer_step`` never does; tests/train/test_gpu_step.py
  runs it under ``torch.cuda.set_sync_debug_mode("error")``);
- everything that changes from step to step lives in device memory: each batch's tensors (the task's too:
  retrieval's image ids) are copied into the graph's input buffers, alpha is a 0-d device tensor, and the
  learning rates are device tensors of a ``capturable`` AdamW (``build_optimizer(..., capturable=True)``;
  ``set_learning_rate`` fills them in place);
- random numbers: dropout draws from torch's default CUDA generator, which every graph registers itself;
  the hard-negative sampler's generator is registered with each graph, so each replay draws new numbers;
- one process (collectives stay eager);
- shapes are fixed per graph: captions of a new length (or, packed, a new token count, rounded up to 64 by the
  trainer) run one eager step (on the capture stream, which also compiles and builds cuDNN plans), and are
  captured the next time that shape comes. With gradient accumulation a graph holds the whole step, every
  micro-batch's forward and backward and the optimizer, and is fixed to the shapes of all of them, in order: the
  combinations can multiply, so past ``MAX_GRAPHS`` graphs new ones run eagerly (counted in ``eager_steps``);
- all graphs allocate from one memory pool. Everything a replay allocates is free again at its end
  (gradients are set to None inside the step) except the (3,) losses, which are copied out right after
  each replay, so graphs of different lengths can reuse each other's memory.

Capture does not run the step: the batch that triggers a capture is then trained by replaying it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from types import SimpleNamespace

import torch

from .step import optimizer_step, pretraining_losses

# Graphs one step object captures at most. Without accumulation a run has one per caption length (padded: at most
# the 30-35 token lengths) or per packed token count (rounded to 64: a few dozen); with it, combinations of those.
# Past this many, a new shape runs eagerly every time instead of being captured: a capture costs about an eager step
# and host memory, and a shape seen that rarely would not pay it back.
MAX_GRAPHS = 64


class CudaGraphStep:
    """``step(micro_batches, alpha)`` = ``optimizer_step(model, optimizer, micro_batches, alpha, ...)``, replayed from
    graphs."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator | None,
                 precision: str = "bf16", clip_grad_norm: float = 0.0, skip_nonfinite: bool = False,
                 forward: Callable = pretraining_losses):
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, not {device}")
        if not all(group.get("capturable", False) and isinstance(group["lr"], torch.Tensor)
                   for group in optimizer.param_groups):
            raise ValueError("CUDA graphs need an AdamW built with capturable=True (device-tensor learning rates)")
        if generator is not None and not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
            raise RuntimeError(f"torch {torch.__version__} cannot register a generator with a CUDA graph "
                               "(CUDAGraph.register_generator_state); use train.cuda_graph=false")
        self.model, self.optimizer, self.generator = model, optimizer, generator
        self.precision, self.clip_grad_norm, self.skip_nonfinite = precision, clip_grad_norm, skip_nonfinite
        self.forward = forward
        self.device = device
        self.alpha = torch.zeros((), device=device)
        self.stream = torch.cuda.Stream(device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, SimpleNamespace] = {}
        self.seen: set[tuple] = set()
        self.eager_steps = 0
        """Steps run eagerly: each shape's first, and every step of a shape past ``MAX_GRAPHS``."""

    @staticmethod
    def key(batch) -> tuple:
        """What one graph is fixed to: each tensor field's shape and dtype (a task's fields too: retrieval's image
        ids), the packed token count, and the value of every other field but the sample keys."""
        packing = getattr(batch, "packing", None)
        fields = []
        for name, value in sorted(vars(batch).items()):
            if isinstance(value, torch.Tensor):
                fields.append((name, tuple(value.shape), value.dtype))
            elif name not in ("keys", "packing"):
                fields.append((name, repr(value)))
        return tuple(fields), None if packing is None else packing.tokens

    def _step(self, micro_batches: list) -> torch.Tensor:
        return optimizer_step(self.model, self.optimizer, micro_batches, self.alpha, self.generator, self.precision,
                              self.clip_grad_norm, autocast_cache=False, skip_nonfinite=self.skip_nonfinite,
                              forward=self.forward)

    @contextlib.contextmanager
    def _on_side_stream(self):
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            yield
        current.wait_stream(self.stream)

    @staticmethod
    def _static_copy(batch) -> SimpleNamespace:
        """The graph's own copy of every tensor field of ``batch``; replays copy each batch in (:meth:`__call__`)."""
        fields = {name: value.clone() if isinstance(value, torch.Tensor) else value
                  for name, value in vars(batch).items() if name != "keys"}
        packing = fields.get("packing")
        if packing is not None:
            fields["packing"] = type(packing)(*(t.clone() for t in packing))
        return SimpleNamespace(**fields)

    def _capture(self, micro_batches: list, key: tuple) -> SimpleNamespace:
        static = [self._static_copy(batch) for batch in micro_batches]
        graph = torch.cuda.CUDAGraph()
        if self.generator is not None:
            graph.register_generator_state(self.generator)
        torch.cuda.synchronize(self.device)
        # the eager step of this key compiled every block it needs; a recompile here would fail inside the
        # capture with an opaque CUDA error, so it fails as what it is instead
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream), \
                torch.compiler.set_stance("fail_on_recompile"):
            losses = self._step(static)
        captured = SimpleNamespace(graph=graph, inputs=static, losses=losses)
        self.graphs[key] = captured
        return captured

    def __call__(self, micro_batches: list, alpha: float) -> torch.Tensor:
        """One optimizer step over ``micro_batches`` (each with images, input_ids, attention_mask, packing or None,
        and the task's tensors such as img_ids, on the model's device); returns the losses."""
        self.alpha.fill_(alpha)
        key = tuple(self.key(batch) for batch in micro_batches)
        captured = self.graphs.get(key)
        if captured is None:
            # first time: an eager step, which also warms this shape up; past the cap, every time
            if key not in self.seen or len(self.graphs) >= MAX_GRAPHS:
                self.seen.add(key)
                self.eager_steps += 1
                with self._on_side_stream():
                    losses = self._step(micro_batches)
                return losses
            captured = self._capture(micro_batches, key)
        for static, batch in zip(captured.inputs, micro_batches, strict=True):
            for name, value in vars(batch).items():
                if isinstance(value, torch.Tensor):
                    getattr(static, name).copy_(value)
            if getattr(static, "packing", None) is not None:
                for static_tensor, new in zip(static.packing, batch.packing, strict=True):
                    static_tensor.copy_(new)
        captured.graph.replay()
        return captured.losses.clone()
