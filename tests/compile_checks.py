"""Compiling in tests: ``compile_blocks`` with the ``aot_eager`` backend -- dynamo's graphs and guards without
inductor's code generation, which takes ~20 s per graph on a 2-core CPU (tests/models/test_compile.py)."""

from blip_fast.models.compile import compile_blocks


def compile_with_aot_eager(monkeypatch, module) -> list[str]:
    """Make ``module.compile_blocks`` compile with ``aot_eager`` (fullgraph); returns the list it fills with the task
    of each model compiled."""
    compiled = []

    def aot_eager(model):
        compiled.append(model.task)
        return compile_blocks(model, backend="aot_eager", fullgraph=True)

    monkeypatch.setattr(module, "compile_blocks", aot_eager)
    return compiled
