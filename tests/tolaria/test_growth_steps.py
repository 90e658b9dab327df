"""Growth steps: size and accuracy before and after each growth, read from a run's records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from esper.nissa.report import write_report
from esper.tolaria.growth_steps import growth_steps


def _transition(step: int, seed_id: str, to_stage: str, **fields: Any) -> dict[str, Any]:
    return {
        "kind": "transition",
        "step": step,
        "slot_id": seed_id,
        "seed_id": seed_id,
        "to_stage": to_stage,
        **fields,
    }


def _evaluation(step: int, accuracy: float, parameters: int, *, final: bool = False) -> dict[str, Any]:
    return {
        "step": step,
        "validation_accuracy": accuracy,
        "validation_loss": 1.0 - accuracy,
        "parameters": parameters,
        "final": final,
    }


WIDEN = {"detail": {"growth": "widen", "layer_id": "fc1"}}
METRICS = [
    _evaluation(20, 0.40, 100),
    _evaluation(40, 0.50, 140),
    _evaluation(60, 0.55, 140),
    _evaluation(80, 0.70, 180),
    _evaluation(100, 0.72, 180),
    _evaluation(100, 0.73, 180, final=True),
]


def test_each_growth_reports_the_model_before_it_started_and_after_it_ended() -> None:
    events = [
        _transition(20, "fc1:w1", "GERMINATED", **WIDEN),
        {"kind": "stacked", "step": 30, "seed_id": "h1:g0", "to_stage": "DORMANT"},
        _transition(50, "fc1:w1", "FOSSILIZED", **WIDEN),
        _transition(60, "h1:g1", "GERMINATED", slot_id="h1", reason="blueprint lowrank, 40 parameters"),
        _transition(70, "h1:g1", "TRAINING", slot_id="h1"),
        _transition(75, "h1:g1", "CULLED", slot_id="h1"),
        _transition(76, "h1:g1", "EMBARGOED", slot_id="h1"),
        _transition(81, "fc2:d2", "GERMINATED", detail={"growth": "deepen", "layer_id": "fc2"}),
    ]
    steps = growth_steps(events, METRICS)
    assert [(s["operation"], s["target"], s["outcome"]) for s in steps] == [
        ("widen", "fc1", "FOSSILIZED"),
        ("seed lowrank", "h1", "CULLED"),
        ("deepen", "fc2", "GERMINATED"),
    ]
    widen, seed, deepen = steps
    assert (widen["step"], widen["end_step"]) == (20, 50)
    assert (widen["params_before"], widen["accuracy_before"]) == (100, 0.40)
    assert (widen["params_after"], widen["accuracy_after"]) == (140, 0.55)
    assert (seed["accuracy_before"], seed["accuracy_after"], seed["end_step"]) == (0.55, 0.70, 75)
    # Still on its way when the run ended: judged by the final evaluation.
    assert (deepen["end_step"], deepen["accuracy_after"], deepen["params_after"]) == (None, 0.73, 180)


def test_a_run_without_growth_has_no_growth_steps() -> None:
    assert growth_steps([], METRICS) == []


def test_the_report_states_accuracy_before_and_after_each_growth_step(tmp_path: Path) -> None:
    root = tmp_path / "run"
    root.mkdir()
    events = [
        _transition(20, "fc1:w1", "GERMINATED", **WIDEN),
        _transition(50, "fc1:w1", "FOSSILIZED", **WIDEN),
    ]
    (root / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in METRICS))
    (root / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    summary = {"run_id": "run-growth", "steps": 100, "growth_steps": growth_steps(events, METRICS)}
    (root / "summary.json").write_text(json.dumps(summary))
    page = write_report(root).markdown.read_text()
    assert "## Growth steps" in page
    assert "| 20 | widen | `fc1` | FOSSILIZED | 100 → 140 | 0.4000 → 0.5500 |" in page
