"""The demo runs end to end, reports finite losses, speed and recall, and states how it departs from BLIP."""

import math

from blip_fast.demo import run_demo


def test_short_demo_run_reports_everything():
    lines = []
    result = run_demo(steps=3, batch=8, eval_size=16, log=lines.append)
    assert result.steps == 3 and result.batch == 8 and result.chance == 1 / 16
    for losses in (result.first_losses, result.last_losses):
        assert set(losses) == {"itc", "itm", "lm"} and all(math.isfinite(v) for v in losses.values())
    assert 0.0 <= result.recall_i2t <= 1.0 and 0.0 <= result.recall_t2i <= 1.0
    assert result.samples_per_s > 0 and result.train_seconds > 0
    assert lines[1].startswith("deviations from BLIP's recipe")
    assert [line.split()[1] for line in lines if line.startswith("step")] == ["1", "3"]
    assert "R@1" in lines[-1] and "chance 6.2%" in lines[-1]
