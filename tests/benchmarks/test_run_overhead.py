"""`benchmarks/run_overhead.py`: its JSON line holds every figure, the per-step breakdown and the load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_last_line_holds_the_ratios_the_breakdown_and_the_load(tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/run_overhead.py",
            "--repeats",
            "1",
            "--epochs",
            "1",
            "--cases",
            "digits:mlp",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=240,
    )
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["benchmark"] == "run_overhead" and summary["target"] == 1.15
    (case,) = summary["cases"]
    for key in ("esper_s", "wait_s", "plain_final_s", "plain_initial_s", "esper_vs_plain", "wait_vs_plain"):
        assert len(case[key]) == 1 and case[key][0] > 0, key
    assert len(case["load_average_before"]) == len(case["load_average_after"]) == 3
    for policy in ("heuristic", "wait"):
        breakdown = case[f"esper_{policy}_us_per_step"]
        for phase in ("forward", "backward", "optimizer", "evaluation", "decision", "checkpoint", "records"):
            assert breakdown[phase] >= 0, (policy, phase)
        calls = case[f"esper_{policy}_calls"]
        assert calls["checkpoint"] >= 2, calls  # the start and the end at least
        assert calls["evaluation"] >= 1, calls
        assert set(case[f"plain_{policy}_us_per_step"]) >= {"forward", "backward", "optimizer", "evaluation"}
