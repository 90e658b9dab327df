"""Run history in SQL: every run's files loaded into an in-memory DuckDB database.

Tables (each row carries its `run_id`):

- `runs`: one row per run (what `esper runs` lists: status, reason, task, host, accuracy, parameters);
- `metrics`: every evaluation of `metrics.jsonl` (per-slot stages and alphas as structs);
- `events`: `events.jsonl` (lifecycle transitions, gates, commands applied or refused, trainer events);
- `decisions`: `decisions.jsonl` (each command Tolaria received, accepted or not, with the policy's reason);
- `decision_records`: Tamiyo's `DecisionRecord`s from `tamiyo.sqlite3`, decoded into columns (nested
  messages and maps joined with `_`, e.g. `head_choices_op`), with their outbox status;
- `field_reports`: Tamiyo's `FieldReport`s, decoded the same way (`metrics_accuracy_delta`, ...).

The files are read once when the database is opened; nothing is written back.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import duckdb

from esper.leyline import EsperError
from esper.nissa.runs import (
    decision_records,
    field_reports,
    find_runs,
    read_jsonl,
    run_info,
)

TABLES = ("runs", "metrics", "events", "decisions", "decision_records", "field_reports")


class QueryError(EsperError):
    """A query DuckDB refused (syntax, unknown table or column)."""


def _loaders() -> dict[str, Callable[[Path], list[dict[str, Any]]]]:
    return {
        "runs": lambda path: [run_info(path).to_json()],
        "metrics": lambda path: read_jsonl(path / "metrics.jsonl"),
        "events": lambda path: read_jsonl(path / "events.jsonl"),
        "decisions": lambda path: read_jsonl(path / "decisions.jsonl"),
        "decision_records": decision_records,
        "field_reports": field_reports,
    }


def _load_table(
    connection: duckdb.DuckDBPyConnection, name: str, rows: Iterable[dict[str, Any]], scratch: Path
) -> None:
    path = scratch / f"{name}.jsonl"
    count = 0
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, sort_keys=True) + "\n")
            count += 1
    if count == 0:
        connection.execute(f"CREATE TABLE {name} (run_id VARCHAR)")
        return
    connection.execute(
        f"CREATE TABLE {name} AS SELECT * FROM read_json_auto(?, format='newline_delimited', "
        "union_by_name=true, sample_size=-1)",
        [str(path)],
    )


def open_history(runs_root: Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB database of every run under `runs_root` (or of that one run)."""
    runs = find_runs(runs_root)
    ids = {path: run_info(path).run_id for path in runs}
    connection = duckdb.connect(":memory:")
    with tempfile.TemporaryDirectory(prefix="esper-sql-") as scratch:
        for name, load in _loaders().items():
            rows = (
                {"run_id": ids[path], **row} if name != "runs" else row for path in runs for row in load(path)
            )
            _load_table(connection, name, rows, Path(scratch))
    return connection


def query(connection: duckdb.DuckDBPyConnection, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run `sql`; the column names and the rows."""
    try:
        cursor = connection.execute(sql)
    except duckdb.Error as exc:
        raise QueryError(f"query failed: {exc}") from exc
    if cursor.description is None:
        return [], []
    columns = [str(d[0]) for d in cursor.description]
    return columns, [tuple(row) for row in cursor.fetchall()]
