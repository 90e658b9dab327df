"""Run history: find the run directories under a folder, say what state each is in, and read their files.

Everything here reads the files a run writes (`metrics.jsonl`, `events.jsonl`, `decisions.jsonl`,
`summary.json`, `config.json`, `status.json`, and Tamiyo's `tamiyo.sqlite3` store) and nothing else, so a
run can be inspected while it trains, after it failed, or on another machine. Logs are read up to their
last complete line: a line still being written is left for the next read.

A run's status comes from `status.json` when the run wrote one (`running` only while its process is
alive: a run whose process is gone without a final status is `failed`, reason "process died"); a run
without one is `completed` when it has a `summary.json` (the summary's own status wins, e.g. `halted`),
and `unknown` otherwise.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict

from esper.leyline import EsperError, pb
from esper.nissa.layout import RunLayout

STATUSES = ("completed", "failed", "halted", "running", "unknown")


class RunReadError(EsperError):
    """A run directory, or one of its files, cannot be read (missing, or not what a run writes)."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"cannot read {path}: {reason}")


def is_run_dir(path: Path) -> bool:
    """A folder a run wrote (it has a metrics log or a resolved config)."""
    return path.is_dir() and ((RunLayout(path).metrics).exists() or (RunLayout(path).config).exists())


def find_runs(root: Path) -> list[Path]:
    """The run directories directly under `root` (or `root` itself when it is one), oldest first."""
    if not root.is_dir():
        raise RunReadError(root, "no such directory")
    if is_run_dir(root):
        return [root]
    runs = [child for child in root.iterdir() if is_run_dir(child)]
    return sorted(runs, key=lambda p: (_started(p) or datetime.min.replace(tzinfo=UTC), p.name))


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`; None when the file does not exist."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RunReadError(path, f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise RunReadError(path, "not a JSON object")
    return data


class JsonlTail:
    """Reads a JSON-lines log incrementally: each `read_new()` returns the records completed since the
    last call (a trailing partial line waits for its newline). A log cut shorter (a resumed run truncates
    its logs back to a checkpoint) is read again from the start, and `reset` is set."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._line = 0
        self.reset = False

    def read_new(self) -> list[dict[str, Any]]:
        self.reset = False
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size < self._offset:
            self._offset, self._line, self.reset = 0, 0, True
        if size == self._offset:
            return []
        with open(self.path, "rb") as handle:
            handle.seek(self._offset)
            chunk = handle.read(size - self._offset)
        complete = chunk[: chunk.rfind(b"\n") + 1]
        records: list[dict[str, Any]] = []
        for raw in complete.splitlines():
            self._line += 1
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise RunReadError(self.path, f"line {self._line} is not JSON: {exc}") from exc
            if not isinstance(record, dict):
                raise RunReadError(self.path, f"line {self._line} is not a JSON object")
            records.append(record)
        self._offset += len(complete)
        return records


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete record of a JSON-lines log (none when the file does not exist)."""
    return JsonlTail(path).read_new()


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _started(path: Path) -> datetime | None:
    status = _safe_json(RunLayout(path).status)
    if status is not None and (started := _parse_time(status.get("started_at"))) is not None:
        return started
    for name in (RunLayout(path).config.name, RunLayout(path).metrics.name):
        if (path / name).exists():
            return datetime.fromtimestamp((path / name).stat().st_mtime, tz=UTC)
    return None


def _safe_json(path: Path) -> dict[str, Any] | None:
    try:
        return read_json(path)
    except RunReadError:
        return None


def run_status(path: Path) -> tuple[str, str | None]:
    """(status, reason) of the run in `path`; see the module's docstring for the rules."""
    status = read_json(RunLayout(path).status)
    summary = read_json(RunLayout(path).summary)
    if status is not None:
        state = str(status.get("status", "unknown"))
        reason = status.get("reason")
        if state == "running":
            pid = status.get("pid")
            if isinstance(pid, int) and pid_alive(pid):
                return "running", None
            return "failed", "process died without recording an end"
        return (state if state in STATUSES else "unknown"), (str(reason) if reason else None)
    if summary is not None:
        state = str(summary.get("status", "completed"))
        halt = summary.get("halt")
        reason = str(halt.get("reason")) if isinstance(halt, dict) and halt.get("reason") else None
        return (state if state in STATUSES else "completed"), reason
    return "unknown", None


@dataclass(frozen=True)
class RunInfo:
    """One line of `esper runs`."""

    run_id: str
    path: Path
    status: str
    reason: str | None
    started_at: datetime | None
    task: str | None
    host: str | None
    policy: str | None
    final_accuracy: float | None
    params_initial: int | None
    params_final: int | None
    steps: int | None

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "path": str(self.path),
            "status": self.status,
            "reason": self.reason,
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "task": self.task,
            "host": self.host,
            "policy": self.policy,
            "final_accuracy": self.final_accuracy,
            "params_initial": self.params_initial,
            "params_final": self.params_final,
            "steps": self.steps,
        }


def _last_metric(path: Path) -> dict[str, Any] | None:
    metrics = [r for r in read_jsonl(RunLayout(path).metrics) if "validation_accuracy" in r]
    return metrics[-1] if metrics else None


def run_info(path: Path) -> RunInfo:
    """What `esper runs` shows of one run directory."""
    status, reason = run_status(path)
    summary = read_json(RunLayout(path).summary) or {}
    config = read_json(RunLayout(path).config) or {}
    last = None if "final_val_accuracy" in summary else _last_metric(path)
    accuracy = summary.get("final_val_accuracy", (last or {}).get("validation_accuracy"))
    params_final = summary.get("params_final", (last or {}).get("parameters"))
    first = read_jsonl(RunLayout(path).metrics)[:1] if "params_initial" not in summary else []
    params_initial = summary.get("params_initial", first[0].get("parameters") if first else None)
    steps = summary.get("steps", (last or {}).get("step"))
    return RunInfo(
        run_id=str(summary.get("run_id") or config.get("training_run_id") or path.name),
        path=path,
        status=status,
        reason=reason,
        started_at=_started(path),
        task=summary.get("task") or config.get("task"),
        host=summary.get("host") or config.get("host"),
        policy=summary.get("policy") or config.get("policy"),
        final_accuracy=float(accuracy) if isinstance(accuracy, int | float) else None,
        params_initial=int(params_initial) if isinstance(params_initial, int) else None,
        params_final=int(params_final) if isinstance(params_final, int) else None,
        steps=int(steps) if isinstance(steps, int) else None,
    )


def resolve_run(name: str, root: Path) -> Path:
    """A run given as a path, or as a run id / folder name under `root`."""
    candidate = Path(name)
    if is_run_dir(candidate):
        return candidate
    if is_run_dir(root / name):
        return root / name
    raise RunReadError(candidate, f"not a run directory, and no run {name!r} under {root}")


def _open_store(path: Path) -> sqlite3.Connection | None:
    store = RunLayout(path).tamiyo_store
    if not store.exists():
        return None
    return sqlite3.connect(f"file:{store}?mode=ro", uri=True)


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for key, inner in value.items():
            _flatten(f"{prefix}_{key}" if prefix else str(key), inner, out)
    elif isinstance(value, list):
        out[prefix] = json.dumps(value, sort_keys=True)
    else:
        out[prefix] = value


def message_columns(message: Any) -> dict[str, Any]:
    """A protobuf message as flat columns: nested messages and maps joined with `_`, enums by name,
    repeated fields as JSON text."""
    data = MessageToDict(message, preserving_proto_field_name=True, use_integers_for_enums=False)
    out: dict[str, Any] = {}
    _flatten("", data, out)
    return out


def _rows(path: Path, query: str, message_type: Any) -> Iterator[dict[str, Any]]:
    connection = _open_store(path)
    if connection is None:
        return
    with closing(connection):
        try:
            rows = connection.execute(query).fetchall()
        except sqlite3.OperationalError as exc:
            raise RunReadError(RunLayout(path).tamiyo_store, str(exc)) from exc
    for status, attempts, blob in rows:
        message = message_type()
        try:
            message.ParseFromString(blob)
        except Exception as exc:  # protobuf raises its own DecodeError, not exported by leyline
            raise RunReadError(
                RunLayout(path).tamiyo_store, f"undecodable {message_type.__name__}: {exc}"
            ) from exc
        yield {"outbox_status": status, "outbox_attempts": attempts, **message_columns(message)}


def decision_records(path: Path) -> list[dict[str, Any]]:
    """Tamiyo's decision records of the run, decoded (the state packet left out: it has its own
    columns in `metrics`), with their outbox status."""
    records = []
    query = "SELECT status, attempts, record FROM decisions ORDER BY issued_at_ns"
    for row in _rows(path, query, pb.DecisionRecord):
        records.append({k: v for k, v in row.items() if not k.startswith(("packet_", "normalizer"))})
    return records


def field_reports(path: Path) -> list[dict[str, Any]]:
    """Tamiyo's field reports of the run, decoded, with their outbox status."""
    query = "SELECT status, attempts, report FROM field_reports ORDER BY issued_at_ns"
    return list(_rows(path, query, pb.FieldReport))


def outbox_counts(path: Path) -> dict[str, dict[str, int]]:
    """Decisions and field reports in Tamiyo's outbox by status (pending, published, dropped)."""
    connection = _open_store(path)
    counts: dict[str, dict[str, int]] = {"decisions": {}, "field_reports": {}}
    if connection is None:
        return counts
    with closing(connection):
        for table in counts:
            try:
                rows = connection.execute(f"SELECT status, count(*) FROM {table} GROUP BY status").fetchall()
            except sqlite3.OperationalError as exc:
                raise RunReadError(RunLayout(path).tamiyo_store, str(exc)) from exc
            counts[table] = {str(status): int(n) for status, n in rows}
    return counts


@dataclass
class RunData:
    """Everything a view shows of one run, read from its files."""

    path: Path
    info: RunInfo
    metrics: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    config: dict[str, Any] | None = None

    @property
    def evaluations(self) -> list[dict[str, Any]]:
        """The evaluations during training (the final evaluation left out), by step."""
        return [r for r in self.metrics if "validation_accuracy" in r and not r.get("final")]


def load_run(path: Path) -> RunData:
    """Read one run directory."""
    if not is_run_dir(path):
        raise RunReadError(path, "not a run directory (no metrics.jsonl or config.json)")
    return RunData(
        path=path,
        info=run_info(path),
        metrics=read_jsonl(RunLayout(path).metrics),
        events=read_jsonl(RunLayout(path).events),
        decisions=read_jsonl(RunLayout(path).decisions),
        summary=read_json(RunLayout(path).summary),
        config=read_json(RunLayout(path).config),
    )


GROWTH_STAGES = ("GERMINATED", "FOSSILIZED", "CULLED")
# The trainer's events worth a line of their own (in the report, in TensorBoard's text).
TRAINER_EVENTS = (
    "rollback",
    "emergency_halt",
    "emergency_broadcast",
    "emergency_channel_unavailable",
    "emergency_channel_recovered",
    "controller_failed",
)
# One colour per stage, shared by the report's plots and the dashboard's charts; the active path goes
# from cool to warm, retirement in greys.
STAGE_COLOURS: dict[str, str] = {
    "DORMANT": "#f0f0f0",
    "GERMINATED": "#9ecae1",
    "TRAINING": "#6baed6",
    "BLENDING": "#fdae6b",
    "SHADOWING": "#fd8d3c",
    "PROBATIONARY": "#e6550d",
    "FOSSILIZED": "#31a354",
    "CULLED": "#de2d26",
    "EMBARGOED": "#969696",
    "RESETTING": "#bdbdbd",
    "TERMINATED": "#636363",
}


def growth_steps(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The transitions that changed the model: germinations, fossilisations and culls."""
    return [e for e in events if e.get("kind") == "transition" and str(e.get("to_stage")) in GROWTH_STAGES]


@dataclass(frozen=True)
class Span:
    """A slot in one stage from `start` to `end` (training steps), held by `seed_id`."""

    slot_id: str
    seed_id: str
    stage: str
    start: int
    end: int


def lifecycle_spans(run: RunData) -> dict[str, list[Span]]:
    """Each slot's stages over time, from its transition events (DORMANT until the first one)."""
    slots: list[str] = []
    for record in run.metrics:
        slots += [str(s) for s in record.get("stages") or {} if str(s) not in slots]
    transitions = [e for e in run.events if e.get("kind") == "transition"]
    slots += sorted({str(e.get("slot_id")) for e in transitions} - set(slots))
    steps = [int(r.get("step", 0)) for r in run.metrics] + [int(e.get("step", 0)) for e in run.events]
    last = max(steps, default=0)
    spans: dict[str, list[Span]] = {}
    for slot_id in slots:
        stage, seed_id, start = "DORMANT", "", 0
        row: list[Span] = []
        for event in (e for e in transitions if str(e.get("slot_id")) == slot_id):
            step = int(event["step"])
            if step > start:
                row.append(Span(slot_id, seed_id, stage, start, step))
            stage, seed_id, start = str(event.get("to_stage")), str(event.get("seed_id", "")), step
        row.append(Span(slot_id, seed_id, stage, start, max(last, start)))
        spans[slot_id] = row
    return spans


def parameter_points(run: RunData) -> list[tuple[int, int]]:
    """(step, parameters) at every evaluation, plus a point at the transition that changed the count: an
    evaluation sees a change only after it happened, so the change moves back to the last transition
    since the previous evaluation, and a plot's steps line up with the events."""
    counted = [
        (int(r["step"]), int(r["parameters"]))
        for r in run.evaluations
        if isinstance(r.get("parameters"), int)
    ]
    moves = sorted(int(e["step"]) for e in run.events if e.get("kind") == "transition")
    points: list[tuple[int, int]] = []
    for index, (step, parameters) in enumerate(counted):
        if index and parameters != counted[index - 1][1]:
            cause = [m for m in moves if counted[index - 1][0] < m <= step]
            if cause and cause[-1] < step:
                points.append((cause[-1], parameters))
        points.append((step, parameters))
    return points
