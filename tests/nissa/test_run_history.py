"""Run history: statuses, logs read while they grow, DuckDB over a real run, the comparison."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from esper.cli import app
from esper.nissa.compare import comparison_rows, write_comparison
from esper.nissa.runs import JsonlTail, RunReadError, find_runs, load_run, parameter_points, run_status
from esper.nissa.sql import QueryError, open_history, query


def _run_dir(root: Path, name: str, **files: object) -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("", encoding="utf-8")
    for file_name, content in files.items():
        (path / f"{file_name}.json").write_text(json.dumps(content), encoding="utf-8")
    return path


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_run_reads_as_running_only_while_its_process_lives(tmp_path: Path) -> None:
    alive = {"status": "running", "reason": None, "pid": os.getpid(), "started_at": "2026-01-01T00:00:00Z"}
    dead = alive | {"pid": _dead_pid()}
    assert run_status(_run_dir(tmp_path, "a", status=alive)) == ("running", None)
    state, reason = run_status(_run_dir(tmp_path, "b", status=dead))
    assert state == "failed"
    assert reason is not None and "died" in reason


def test_a_run_without_a_status_file_is_completed_with_a_summary_and_unknown_without(tmp_path: Path) -> None:
    failed = {"status": "failed", "reason": "diverged", "pid": 1, "started_at": "2026-01-01T00:00:00Z"}
    assert run_status(_run_dir(tmp_path, "done", summary={"status": "completed"})) == ("completed", None)
    assert run_status(_run_dir(tmp_path, "gone")) == ("unknown", None)
    assert run_status(_run_dir(tmp_path, "bad", status=failed)) == ("failed", "diverged")
    halted = {"status": "halted", "halt": {"reason": "operator"}}
    assert run_status(_run_dir(tmp_path, "halted", summary=halted)) == ("halted", "operator")


def test_a_log_is_read_up_to_its_last_complete_line_and_again_after_a_truncation(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"step": 2', encoding="utf-8")
    tail = JsonlTail(log)
    assert tail.read_new() == [{"step": 1}]
    with open(log, "a", encoding="utf-8") as handle:
        handle.write('}\n{"step": 3}\n')
    assert tail.read_new() == [{"step": 2}, {"step": 3}]
    log.write_text('{"step": 1}\n', encoding="utf-8")
    assert tail.read_new() == [{"step": 1}]
    assert tail.reset


def test_a_broken_log_line_is_an_error_naming_the_line(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\nnot json\n', encoding="utf-8")
    with pytest.raises(RunReadError, match="line 2"):
        JsonlTail(log).read_new()


@pytest.mark.slow
def test_sql_queries_a_real_runs_metrics_events_and_decoded_protobuf(runs_dir: Path) -> None:
    connection = open_history(runs_dir)
    _, rows = query(connection, "SELECT status, task, params_final >= params_initial FROM runs")
    assert rows == [("completed", "task-d0.9", True)]
    _, rows = query(
        connection, "SELECT count(*) FROM metrics WHERE run_id = (SELECT run_id FROM runs) AND final"
    )
    assert rows == [(1,)]
    _, rows = query(connection, "SELECT count(*) FROM events WHERE to_stage = 'GERMINATED'")
    assert rows[0][0] >= 1
    _, rows = query(
        connection, "SELECT outcome, action, metrics_accuracy_delta, outbox_status FROM field_reports"
    )
    assert rows and all(str(r[0]).startswith("FIELD_REPORT_OUTCOME_") for r in rows)
    _, rows = query(connection, "SELECT DISTINCT final_command_type FROM decision_records")
    assert ("COMMAND_SEED",) in rows
    _, rows = query(connection, "SELECT count(*) FROM decisions WHERE annotations.reason IS NOT NULL")
    assert rows[0][0] > 0


@pytest.mark.slow
def test_a_query_duckdb_refuses_is_a_query_error(runs_dir: Path) -> None:
    with pytest.raises(QueryError, match="no_such_table"):
        query(open_history(runs_dir), "SELECT * FROM no_such_table")


@pytest.mark.slow
def test_esper_sql_prints_json_rows(runs_dir: Path) -> None:
    args = ["sql", "SELECT run_id, status FROM runs", "--runs-dir", str(runs_dir), "--format", "json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    row = json.loads(result.output)
    assert row["run_id"].startswith("run-") and row["status"] == "completed"


@pytest.mark.slow
def test_esper_runs_lists_every_run_with_its_status_within_80_columns(runs_dir: Path) -> None:
    status = {"status": "failed", "reason": "loss diverged", "pid": 1, "started_at": "2026-01-01T00:00:00Z"}
    _run_dir(runs_dir, "broken", status=status)
    result = CliRunner().invoke(app, ["runs", "--runs-dir", str(runs_dir)], terminal_width=80)
    assert result.exit_code == 0, result.output
    assert "failed: loss diverged" in result.output
    assert "completed" in result.output and "task-d0.9" in result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80


def test_esper_runs_on_a_missing_folder_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["runs", "--runs-dir", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert "esper runs failed: cannot read" in " ".join(result.output.split())


@pytest.mark.slow
def test_compare_tabulates_runs_and_plots_accuracy_against_parameters(runs_dir: Path, tmp_path: Path) -> None:
    runs = [load_run(path) for path in find_runs(runs_dir)]
    rows = comparison_rows(runs)
    assert rows[0]["run"].startswith("run-") and rows[0]["growth"] != "0"
    files = write_comparison(runs, tmp_path / "cmp")
    assert [p.name for p in files.images] == ["accuracy_vs_parameters.png", "growth_timeline.png"]
    assert all(p.stat().st_size > 1000 for p in files.images)
    assert any("FLOPs" in note for note in files.notes)


@pytest.mark.slow
def test_esper_compare_names_a_missing_run(runs_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["compare", "grown", "nope", "--runs-dir", str(runs_dir)])
    assert result.exit_code == 2
    assert "nope" in result.output


@pytest.mark.slow
def test_esper_reports_on_a_real_run_fits_80_columns_without_cutting(runs_dir: Path) -> None:
    result = CliRunner().invoke(app, ["reports", str(runs_dir / "grown")], terminal_width=80)
    assert result.exit_code == 0, result.output
    assert max(len(line.rstrip()) for line in result.output.splitlines()) <= 80
    assert "…" not in result.output


def test_parameter_changes_line_up_with_the_transition_that_caused_them(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, "r")
    metrics = [{"step": s, "validation_accuracy": 0.5, "parameters": p} for s, p in ((10, 100), (20, 150))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics), encoding="utf-8")
    event = {"kind": "transition", "step": 16, "slot_id": "h1", "seed_id": "h1:g1", "to_stage": "GERMINATED"}
    (run / "events.jsonl").write_text(json.dumps(event) + "\n", encoding="utf-8")
    assert parameter_points(load_run(run)) == [(10, 100), (16, 150), (20, 150)]
