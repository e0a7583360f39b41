"""The demo runs end to end and reports finite losses and recall (a learning check would take minutes)."""

import math

from blip_fast.demo import run_demo


def test_short_demo_run_reports_everything():
    lines = []
    result = run_demo(steps=3, batch=8, eval_size=16, log=lines.append)
    assert result.steps == 3 and result.chance == 1 / 16
    for losses in (result.first_losses, result.last_losses):
        assert set(losses) == {"itc", "itm", "lm"} and all(math.isfinite(v) for v in losses.values())
    assert 0.0 <= result.recall_i2t <= 1.0 and 0.0 <= result.recall_t2i <= 1.0
    assert result.samples_per_s > 0
    assert any("differ from BLIP" in line for line in lines) and "R@1" in lines[-1]
