"""Backend selection: environment variable, set_impl, scopes, fallbacks, logging once."""

import logging

import pytest
import torch

from blip_fast import ops
from blip_fast.ops import registry


def test_environment_variable_selects_backend(monkeypatch):
    monkeypatch.setenv("BLIP_FAST_IMPL", "reference")
    assert registry.requested_impl() == "reference"
    assert ops.OPS["attention"].select(torch.device("cpu")) == "reference"
    monkeypatch.setenv("BLIP_FAST_IMPL", "auto")
    assert ops.OPS["attention"].select(torch.device("cpu")) == "torch"


def test_invalid_environment_value_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("BLIP_FAST_IMPL", "fastest")
    with pytest.raises(ValueError, match="BLIP_FAST_IMPL must be one of"):
        registry.requested_impl()


def test_set_impl_overrides_environment_and_scope_restores(monkeypatch):
    monkeypatch.setenv("BLIP_FAST_IMPL", "reference")
    ops.set_impl("torch")
    assert ops.OPS["momentum_update"].select(torch.device("cpu")) == "torch"
    with ops.impl_scope("reference"):
        assert ops.OPS["momentum_update"].select(torch.device("cpu")) == "reference"
    assert registry.requested_impl() == "torch"
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.set_impl("cudnn")


def test_unavailable_backend_falls_back_in_auto_order():
    ops.set_impl("triton")  # no triton kernel runs on CPU tensors
    picked = ops.OPS["attention"].select(torch.device("cpu"))
    assert picked == "torch"
    assert ops.OPS["itc_loss"].select(torch.device("cpu")) == "reference"


def test_choice_is_logged_once(caplog):
    ops.set_impl("auto")
    with caplog.at_level(logging.INFO, logger="blip_fast.ops"):
        for _ in range(3):
            ops.OPS["attention"].select(torch.device("cpu"))
    assert sum("blip_fast op attention on cpu" in r.message for r in caplog.records) == 1


def test_an_eager_selection_does_not_invalidate_compiled_graphs(monkeypatch):
    """The first eager use of an op logs its choice. Compiled code must not guard on that log: the trainer's eager
    code selects ops (the momentum update) between two compiled steps, and a recompile in the second would happen
    inside the CUDA graph's capture, which fails there (seen on the H100: bench step's fast impl)."""
    monkeypatch.setattr(registry, "_logged", set())
    q, k, v = (torch.randn(2, 3, 7, 8) for _ in range(3))
    torch._dynamo.reset()
    compiled = torch.compile(lambda *args: ops.attention(*args), fullgraph=True, backend="eager")
    try:
        compiled(q, k, v)
        ops.OPS["momentum_update"].select(torch.device("cpu"))  # eager: logged now
        with torch.compiler.set_stance("fail_on_recompile"):
            compiled(q, k, v)
    finally:
        torch._dynamo.reset()


def test_every_op_of_the_issue_is_registered():
    assert {"attention", "itc_loss", "lm_loss", "sample_hard_negatives", "momentum_update",
            "enqueue"} <= set(ops.OPS)


def test_inputs_a_kernel_does_not_take_go_to_the_reference():
    # the hard-negative kernels read fp32/fp16/bf16 logits; fp64 (used by exactness checks) takes the reference
    # under auto instead of failing inside the kernel
    op = ops.OPS["sample_hard_negatives"]
    cpu = torch.device("cpu")
    assert op.select(cpu, torch.float64) == "reference"
    assert op.available(cpu, torch.float64) == ["reference"]
    assert op.select(cpu, torch.float32) == op.available(cpu)[0]
    sim = torch.randn(6, 9, dtype=torch.float64)
    uniforms = torch.rand(6)
    with ops.impl_scope("auto"):
        picked = ops.sample_hard_negatives(sim, uniforms)
    with ops.impl_scope("reference"):
        assert torch.equal(picked, ops.sample_hard_negatives(sim, uniforms))


def test_single_ops_can_take_their_own_backend(monkeypatch):
    """``BLIP_FAST_IMPL=auto,lm_loss=reference``: one op opted out of its fast backend, the others unchanged."""
    cpu = torch.device("cpu")
    monkeypatch.setenv("BLIP_FAST_IMPL", "auto,attention=reference")
    assert registry.requested_impl("attention") == "reference" and registry.requested_impl("enqueue") == "auto"
    assert ops.OPS["attention"].select(cpu) == "reference"
    assert ops.OPS["momentum_update"].select(cpu) == "torch"
    ops.set_impl("reference, momentum_update = torch")  # spaces and order are free
    assert ops.OPS["momentum_update"].select(cpu) == "torch"
    assert ops.OPS["attention"].select(cpu) == "reference"
    with ops.impl_scope("auto,momentum_update=reference"):
        assert ops.OPS["momentum_update"].select(cpu) == "reference"
        assert ops.OPS["attention"].select(cpu) == "torch"


@pytest.mark.parametrize("spec,message", [
    ("auto,lm=reference", "no op named 'lm'; the ops are"),
    ("auto,lm_loss=fastest", "must be one of"),
    ("auto,=torch", "must be one of"),
    ("fastest,lm_loss=reference", "must be one of"),
])
def test_bad_per_op_choices_are_clear_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        ops.set_impl(spec)
    from blip_fast.config import ConfigError
    from blip_fast.train.config import TrainConfig

    with pytest.raises(ConfigError, match=message):
        TrainConfig(impl=spec)


def test_per_op_choice_holds_inside_a_compiled_graph():
    q, k, v = (torch.randn(2, 3, 7, 8) for _ in range(3))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    torch._dynamo.reset()
    compiled = torch.compile(lambda *args: ops.attention(*args), fullgraph=True, backend="eager")
    with ops.impl_scope("torch,attention=reference"):
        out = compiled(q, k, v, mask)
    torch._dynamo.reset()
    assert torch.equal(out, ops.attention_ref(q, k, v, mask))


def test_a_backend_left_out_of_auto_runs_only_when_named():
    """``register(..., auto=False)``: a kernel not yet timed (the packed attention) is passed over by ``auto`` and
    picked where it is named, alone or per op."""
    op = registry.Op("probe", lambda x: x)
    op.register("torch", lambda x: x + 1, devices=("cpu",), auto=False)
    cpu = torch.device("cpu")
    assert op.available(cpu) == ["torch", "reference"]
    with ops.impl_scope("auto"):
        assert op.select(cpu) == "reference"
    with ops.impl_scope("torch"):
        assert op.select(cpu) == "torch"
