"""The run report: plots and a markdown page from a run directory; missing data shown as missing."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from esper.cli import app
from esper.cli.run import summary_table
from esper.nissa.report import (
    ReportError,
    RunRecord,
    Segment,
    lifecycle_segments,
    operation_name,
    parameter_steps,
    read_run,
    render_markdown,
    summary_rows,
    write_report,
)
from tests.conftest import finished_summary

PNG = b"\x89PNG\r\n\x1a\n"


def _transition(step: int, slot: str, seed: str, from_stage: str, to_stage: str) -> dict[str, Any]:
    return {"kind": "transition", "step": step, "slot_id": slot, "seed_id": seed, "from_stage": from_stage,
            "to_stage": to_stage, "reason": ""}  # fmt: skip


def _write_run(root: Path, *, summary: bool = True) -> Path:
    root.mkdir(parents=True)
    metrics = [
        {"step": step, "final": False, "validation_accuracy": 0.5 + step / 400,
         "validation_loss": 1.0 - step / 200, "parameters": 100 if step < 60 else 140,
         "stages": {"h1": "DORMANT", "h2": "DORMANT"}}
        for step in range(10, 101, 10)
    ]  # fmt: skip
    metrics.append({**metrics[-1], "final": True})
    events = [
        _transition(20, "h1", "h1:g1", "DORMANT", "GERMINATED"),
        _transition(21, "h1", "h1:g1", "GERMINATED", "TRAINING"),
        _transition(40, "h1", "h1:g1", "TRAINING", "BLENDING"),
        _transition(50, "h1", "h1:g1", "BLENDING", "SHADOWING"),
        _transition(55, "h1", "h1:g1", "SHADOWING", "PROBATIONARY"),
        _transition(60, "h1", "h1:g1", "PROBATIONARY", "FOSSILIZED"),
        _transition(30, "h2", "h2:g1", "DORMANT", "GERMINATED"),
        _transition(30, "h2", "h2:g1", "GERMINATED", "TRAINING"),
        _transition(45, "h2", "h2:g1", "TRAINING", "CULLED"),
        _transition(46, "h2", "h2:g1", "CULLED", "EMBARGOED"),
        _transition(70, "h2", "h2:g1", "EMBARGOED", "RESETTING"),
        _transition(71, "h2", "h2:g1", "RESETTING", "DORMANT"),
        {"kind": "rollback", "step": 80, "reason": "loss is nan", "detail": {}},
    ]
    (root / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (root / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    if summary:
        (root / "summary.json").write_text(
            json.dumps({"run_id": "run-report", "steps": 100, "final_val_accuracy": 0.75,
                        "params_initial": 100, "params_final": 140, "status": "completed",
                        "transitions": {"FOSSILIZED": 1}})
        )  # fmt: skip
    return root


def test_segments_follow_each_slot_from_dormant_to_its_last_stage(tmp_path: Path) -> None:
    record = read_run(_write_run(tmp_path / "run"))
    segments = lifecycle_segments(record)
    h1 = [s for s in segments if s.slot_id == "h1"]
    assert h1[0] == Segment("h1", "h1", "DORMANT", 0, 20)
    assert [s.stage for s in h1] == [
        "DORMANT", "GERMINATED", "TRAINING", "BLENDING", "SHADOWING", "PROBATIONARY", "FOSSILIZED"
    ]  # fmt: skip
    assert h1[-1] == Segment("h1", "h1:g1", "FOSSILIZED", 60, 100)
    h2 = [(s.stage, s.start, s.end) for s in segments if s.slot_id == "h2"]
    assert h2 == [
        ("DORMANT", 0, 30),
        ("GERMINATED", 30, 30),
        ("TRAINING", 30, 45),
        ("CULLED", 45, 46),
        ("EMBARGOED", 46, 70),
        ("RESETTING", 70, 71),
        ("DORMANT", 71, 100),
    ]


@pytest.mark.slow
def test_report_writes_plots_and_a_page_naming_every_seed(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "run")
    files = write_report(run)
    assert files.markdown == run / "report" / "report.md"
    for image in files.images:
        assert image.read_bytes().startswith(PNG) and image.stat().st_size > 5_000, image
    page = files.markdown.read_text()
    assert "# Esper run report: run-report" in page
    assert "| final_val_accuracy | 0.7500 |" in page
    assert "| seeds_culled | missing |" in page  # not in this summary: shown as missing, not 0
    assert "`h1:g1` in slot `h1`: GERMINATED (20) → TRAINING (21)" in page and "FOSSILIZED (60)" in page
    assert "CULLED (45) → EMBARGOED (46) → RESETTING (70) → DORMANT (71)" in page
    assert "step 80: rollback: loss is nan" in page
    for name in ("accuracy.png", "accuracy_vs_parameters.png", "parameters.png", "lifecycle.png"):
        assert f"]({name})" in page


def test_an_unfinished_run_is_reported_as_unfinished(tmp_path: Path) -> None:
    page = write_report(_write_run(tmp_path / "run", summary=False)).markdown.read_text()
    assert "No summary.json" in page


def test_an_empty_run_still_renders_and_says_what_is_missing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    files = write_report(run)
    assert all(image.read_bytes().startswith(PNG) for image in files.images)
    assert "No seed was germinated." in files.markdown.read_text()


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        (lambda run: None, "no such directory"),
        (lambda run: run.mkdir(), "not a run directory"),
        (lambda run: (run.mkdir(), (run / "metrics.jsonl").write_text("{not json\n")), "line 1 is not JSON"),
        (lambda run: (run.mkdir(), (run / "metrics.jsonl").write_text('{"step": "x"}\n')), "integer step"),
    ],
)
def test_what_is_not_a_run_is_a_report_error(tmp_path: Path, setup: Any, match: str) -> None:
    run = tmp_path / "run"
    setup(run)
    with pytest.raises(ReportError, match=match):
        write_report(run)


def test_cli_report_renders_a_run_and_fails_clearly_on_a_non_run(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "run")
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "report" / "report.md").exists()
    result = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert result.exit_code == 1 and "no such directory" in " ".join(result.output.split())


def _record(metrics: list[dict[str, Any]], events: list[dict[str, Any]]) -> RunRecord:
    return RunRecord(root=Path("run"), metrics=metrics, events=events, summary=None, config=None)


def test_the_parameter_count_changes_at_the_growth_event_not_at_the_next_evaluation() -> None:
    metrics = [
        {"step": 10, "parameters": 100},
        {"step": 20, "parameters": 150},
        {"step": 30, "parameters": 150},
    ]
    events = [_transition(16, "h1", "h1:g1", "DORMANT", "GERMINATED")]
    assert parameter_steps(_record(metrics, events)) == [(10, 100), (16, 150), (20, 150), (30, 150)]


def test_a_change_without_an_event_between_evaluations_stays_at_its_evaluation() -> None:
    metrics = [{"step": 10, "parameters": 100}, {"step": 20, "parameters": 150}]
    assert parameter_steps(_record(metrics, [])) == [(10, 100), (20, 150)]


def test_the_lifecycle_names_each_seed_with_its_blueprint() -> None:
    germinated = _transition(16, "h2", "h2:g1", "DORMANT", "GERMINATED") | {
        "reason": "blueprint mlp_expand, 1212 parameters"
    }
    record = _record([], [germinated])
    assert operation_name(record, "h2:g1") == "h2:g1 mlp_expand"
    assert operation_name(record, "h9:g1") == "h9:g1"


def test_esper_run_and_the_report_show_the_same_summary_figures(tmp_path: Path) -> None:
    """One list of headline figures serves the report's table and the table `esper run` prints."""
    summary = finished_summary(params_final=120, seeds_fossilized=1, decisions=2, decision_deadline_misses=1)
    table = summary_table(summary)
    printed = list(zip(table.columns[0].cells, table.columns[1].cells, strict=True))
    rows = summary_rows(summary.to_json())
    assert printed == rows
    assert ("steps", "10") in rows and ("decision_deadline_misses", "1") in rows
    assert ("max_params", "unbounded") in rows
    run = _write_run(tmp_path / "run")
    (run / "summary.json").write_text(json.dumps(summary.to_json()))
    record = read_run(run)
    markdown = render_markdown(record, lifecycle_segments(record), defaultdict(str))  # no plots drawn
    for key, value in rows:
        assert f"| {key} | {value} |" in markdown
