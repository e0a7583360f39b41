"""benchmarks/gpu_session.sh, which only a GPU machine runs: its groups name stages it has, and it parses."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_session.sh"


def groups_and_stages() -> tuple[dict[str, list[str]], set[str]]:
    text = SCRIPT.read_text()
    groups = {name: stages.split() for name, stages in re.findall(r'^\s+\[(\w+)\]="([^"]*)"', text, re.M)}
    stages = set(re.findall(r"^ {8}(\w+)\)", text, re.M))
    return groups, stages


def test_every_group_runs_stages_the_script_has():
    groups, stages = groups_and_stages()
    assert groups["core"] == ["build", "tests", "parity", "step"]  # the default: one call
    missing = {name: [s for s in members if s not in stages] for name, members in groups.items()}
    assert not any(missing.values()), missing
    grouped = {s for members in groups.values() for s in members}
    # stages outside every group are the ones the header names as run alone
    assert stages - grouped == {"distributed", "retrieval_eval_full", "data", "before_after", "report"}


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
