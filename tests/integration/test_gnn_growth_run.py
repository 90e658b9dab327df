"""`esper run --policy gnn --max-params N` on digits: the GNN's WIDEN reaches Kasmina and is applied."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from esper.cli import app
from esper.leyline import pb
from esper.tamiyo.model.policy import GNNPolicy
from esper.tamiyo.model.proposal import ACTIONS
from esper.tamiyo.settings import TamiyoSettings


@pytest.mark.slow
def test_a_gnn_run_widens_a_layer_that_kasmina_applies_within_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The policy is untrained except for a test-only tweak: its action head's WIDEN bias is raised, so
    that it widens whenever a widen is legal (training one by imitation takes minutes on this machine)."""
    monkeypatch.setenv("ESPER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ESPER_SIGNING_SECRET", "gnn-growth-run-secret-0123456789")
    monkeypatch.setenv("TAMIYO_STEP_TIMEOUT_MS", "1000")  # a busy machine must not turn decisions into misses
    policy = GNNPolicy(TamiyoSettings())
    with torch.no_grad():
        policy.module.action_head.bias[ACTIONS.index(pb.POLICY_ACTION_WIDEN)] += 30.0
    weights = tmp_path / "widen.safetensors"
    policy.save(weights)
    run_dir = tmp_path / "run"
    budget = 20_000
    args = ["run", "--policy", "gnn", "--policy-checkpoint", str(weights), "--max-params", str(budget)]
    args += ["--epochs", "2", "--decision-interval", "5", "--run-dir", str(run_dir), "--no-progress"]
    result = CliRunner().invoke(app, [*args, "--no-report"])
    assert result.exit_code == 0, result.output
    decisions = [json.loads(line) for line in (run_dir / "decisions.jsonl").read_text().splitlines()]
    widens = [d for d in decisions if d.get("operation") == "WIDEN"]
    assert widens, decisions
    assert all(d["annotations"]["policy_action"] == "POLICY_ACTION_WIDEN" for d in widens)
    assert all(d["accepted"] and not d["rejection"] for d in widens)  # the masks keep Kasmina's rules
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    applied = {e["command_id"]: e for e in events if e["kind"] == "command_applied"}
    first = applied[widens[0]["command_id"]]
    assert first["reason"].startswith(f"widen {widens[0]['target_seed_id']} by ")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["policy"] == "gnn" and summary["max_params"] == budget
    assert summary["params_final"] <= budget
