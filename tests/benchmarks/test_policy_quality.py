"""`benchmarks/policy_quality.py`: every contender on the same held-out tasks, paired differences, the
Pareto view and the learning curve in its last line, with strict graphs (no feature missing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_last_line_holds_every_policy_the_paired_differences_and_the_curve(tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/policy_quality.py",
            "--train-tasks",
            "1",
            "--eval-tasks",
            "2",
            "--iterations",
            "1",
            "--curve-tasks",
            "1",
            "--epochs",
            "2",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    policies = {"wait_only", "heuristic", "random", "imitation_gnn", "learned_gnn"}
    assert set(summary["results"]) == policies
    for figures in summary["results"].values():
        assert {"accuracy", "params", "objective"} <= set(figures)
    # Held-out tasks never overlap the training tasks, and the families alternate.
    assert not set(summary["eval_tasks"]) & set(summary["train_tasks"])
    assert (
        summary["eval_tasks"][0].startswith("generated-mlp")
        and "signals-conv1d" not in summary["eval_tasks"][0]
    )
    assert {"learned_gnn-heuristic", "learned_gnn-imitation_gnn", "random-heuristic"} <= set(
        summary["paired_differences"]
    )
    assert set(summary["pareto_front"]) == policies and any(summary["pareto_front"].values())
    assert [point["round"] for point in summary["learning_curve"]] == ["imitation", "ppo0"]
    assert summary["learning_curve"][0]["episodes"] < summary["learning_curve"][1]["episodes"]
