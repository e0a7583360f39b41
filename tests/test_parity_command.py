"""``blip-fast parity``: runs fast backends against references and fails when one is wrong."""

import pytest
import torch

from blip_fast import ops
from blip_fast.cli import main
from blip_fast.parity import _compare, check_case, format_table, run_parity


def test_cpu_parity_passes_for_the_registered_backends():
    rows = run_parity(torch.device("cpu"), ops=["momentum_update", "enqueue"], dtypes=[torch.float32])
    assert rows and all(r.passed for r in rows), format_table(rows)
    assert {r.op for r in rows} == {"momentum_update", "enqueue"}


def test_attention_parity_rows_cover_forward_and_gradients():
    case = ops.OPS["attention"].parity_cases[3]  # text_bidirectional_odd: small
    rows = check_case("attention", "torch", case, torch.float32, torch.device("cpu"))
    assert [r.what for r in rows] == ["out[0]", "grad[0]", "grad[1]", "grad[2]"]
    assert all(r.passed for r in rows), format_table(rows)


def test_a_wrong_fast_implementation_is_caught():
    op = ops.OPS["momentum_update"]
    original = op.impls["torch"]

    def off_by_a_little(params_m, params, momentum):
        original.fn(params_m, params, momentum)
        params_m[0].add_(1e-3)

    op.register("torch", off_by_a_little, devices=("cpu",))
    try:
        rows = run_parity(torch.device("cpu"), ops=["momentum_update"], dtypes=[torch.float32])
        assert not rows[0].passed and all(r.passed for r in rows[1:])
        assert main(["parity", "--device", "cpu", "--op", "momentum_update", "--dtype", "fp32"]) == 1
    finally:
        op.impls["torch"] = original


def test_the_floor_scales_with_the_values_compared():
    """Gradients far below 1 (the LM loss's are ~1e-4): the reference's own bf16 rounding passes, zeros do not (an
    absolute floor of 1.6e-2 would have passed them)."""
    truth = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1e-3
    low = truth.to(torch.bfloat16)
    assert _compare(low, low, truth, torch.bfloat16, exact=False)[3]
    assert not _compare(torch.zeros_like(low), low, truth, torch.bfloat16, exact=False)[3]
    assert not _compare(low * 1.1, low, truth, torch.bfloat16, exact=False)[3]


def test_cli_parity_exit_status_and_json(tmp_path, capsys):
    out = tmp_path / "parity.json"
    assert main(["parity", "--device", "cpu", "--op", "enqueue", "--dtype", "fp32", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "enqueue" in printed and "passed, 0 failed" in printed
    assert out.read_text().count('"passed": true') == 2


@pytest.mark.parametrize("device", ["foo", "mps"])
def test_a_device_that_is_not_here_is_one_line(device, capsys):
    """--device names torch does not know and devices blip-fast does not run on: exit status 2 and one line, not a
    traceback (the same helper serves caption, answer and match)."""
    assert main(["parity", "--device", device, "--op", "enqueue"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --device {device}")


def test_an_unknown_op_is_an_error_naming_the_ops():
    """A typo used to select no op, print that nothing is available and exit 0: a check that passes by checking
    nothing."""
    with pytest.raises(ValueError, match=r"no op named 'momentum_updat'; the ops are .*enqueue.*momentum_update"):
        run_parity(torch.device("cpu"), ops=["momentum_update", "momentum_updat"])


def test_cli_parity_with_an_unknown_op_exits_2(capsys):
    assert main(["parity", "--device", "cpu", "--op", "typo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no op named 'typo'; the ops are ") and "attention" in err[0]
