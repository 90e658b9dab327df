"""`benchmarks/policy_quality.py`: every contender on the same held-out tasks, paired differences, the
Pareto view and the learning curve in its last line, with strict graphs (no feature missing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_benchmark(tmp_path: Path, *extra: str) -> dict[str, Any]:
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "benchmarks/policy_quality.py", "--curve-tasks", "1", "--epochs", "2", *extra],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return summary


@pytest.mark.slow
def test_the_last_line_holds_every_policy_the_paired_differences_and_the_curve(tmp_path: Path) -> None:
    summary = run_benchmark(tmp_path, "--train-tasks", "1", "--eval-tasks", "2", "--iterations", "1")
    policies = {
        "wait_only",
        "heuristic",
        "heuristic_tuned",
        "random",
        "imitation_gnn",
        "learned_gnn",
        "heuristic_matched",
    }
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
    # Every task has its budget, the same for every policy; the matched heuristic never outgrows the
    # learned policy on its task, and the verdict names both of the conditions.
    assert set(summary["budgets"]) == {*summary["train_tasks"], *summary["eval_tasks"]}
    matched = zip(summary["per_task"]["heuristic_matched"], summary["per_task"]["learned_gnn"], strict=True)
    assert all(m["params"] <= learned["params"] for m, learned in matched)
    assert "learned_gnn-heuristic_matched" in summary["paired_differences"]
    assert isinstance(summary["done_when_met"], bool)
    # The tuned heuristic is the stopping rule that scored best on the training tasks, among those tried.
    tuned = summary["heuristic_tuned"]
    assert set(tuned["training_objective"]) == {
        "heuristic",
        "heuristic_gain1e-4",
        "heuristic_gain1e-3",
        "heuristic_share0.25",
        "heuristic_share0.5",
    }
    assert tuned["chosen"] == max(tuned["training_objective"], key=tuned["training_objective"].get)
    assert "learned_gnn-heuristic_tuned" in summary["paired_differences"]


@pytest.mark.slow
def test_expert_iteration_clones_the_best_runs_and_keeps_the_best_round(tmp_path: Path) -> None:
    summary = run_benchmark(
        tmp_path,
        "--train-tasks",
        "2",
        "--eval-tasks",
        "1",
        "--iterations",
        "1",
        "--improve",
        "distil",
        "--expert-gains",
        "1e-3",
        "--select-tasks",
        "1",
        "--contenders",
        "heuristic,learned_gnn",
    )
    # Each training task's best run is named with the policy that ran it.
    assert len(summary["expert_winners"]) == 2
    variants = {"heuristic_gain1e-3", "heuristic_share0.25", "heuristic_share0.5"}
    assert set(summary["expert_winners"].values()) <= {"heuristic", "gnn0", *variants}
    # The imitation policy and the round were scored on validation tasks; exactly one of them is best.
    assert [point["round"] for point in summary["selection"]] == ["imitation", "distil0"]
    assert summary["selection"][0]["kept"]
    assert [point["round"] for point in summary["learning_curve"]] == ["imitation", "distil0"]
