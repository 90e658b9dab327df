"""`esper watch`: a live terminal view of one run, read from its files as they are written.

`RunFollower` reads the run directory incrementally (new log lines, Tamiyo's outbox, the status file) into
a `LiveState`; `WatchApp` (Textual) polls it on a timer and redraws: accuracy and loss curves, parameters
over time, each slot's and each seed's lifecycle, the last decisions with their reasons, deadline misses,
the field-report outbox and the bus's health. No server is involved, so it works over SSH on the machine
that trains, or on a copy of the run directory.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Footer, Header, Sparkline, Static

from esper.nissa.runs import JsonlTail, RunReadError, is_run_dir, outbox_counts, read_json, run_status

DECISIONS_SHOWN = 12
BUS_EVENTS = ("emergency_channel_unavailable", "emergency_channel_recovered", "emergency_broadcast")


@dataclass
class SeedPath:
    """One seed (or growth operation) in a slot: the stages it went through, with their steps."""

    slot_id: str
    seed_id: str
    stages: list[tuple[str, int]] = field(default_factory=list)
    reason: str = ""

    @property
    def stage(self) -> str:
        return self.stages[-1][0] if self.stages else "DORMANT"


@dataclass
class LiveState:
    """What the view shows, accumulated from the run's records."""

    evaluations: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] | None = None
    seeds: dict[str, SeedPath] = field(default_factory=dict)
    slot_stages: dict[str, str] = field(default_factory=dict)
    decisions: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=DECISIONS_SHOWN))
    decision_count: int = 0
    rejected: int = 0
    deadline_misses: int = 0
    controller_failures: int = 0
    bus: str = "ok"
    trainer_events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=5))
    outbox: dict[str, dict[str, int]] = field(default_factory=dict)
    status: tuple[str, str | None] = ("unknown", None)
    run_id: str = ""

    def add_metric(self, record: dict[str, Any]) -> None:
        if "validation_accuracy" not in record:
            return
        if record.get("final"):
            self.final = record
        else:
            self.evaluations.append(record)
        for slot_id, stage in (record.get("stages") or {}).items():
            self.slot_stages[str(slot_id)] = str(stage)

    def add_event(self, event: dict[str, Any]) -> None:
        kind = event.get("kind")
        step = int(event.get("step", 0))
        if kind == "transition":
            seed_id = str(event.get("seed_id") or event.get("slot_id"))
            path = self.seeds.setdefault(seed_id, SeedPath(str(event.get("slot_id")), seed_id))
            path.stages.append((str(event.get("to_stage")), step))
            path.reason = str(event.get("reason", ""))
            self.slot_stages[path.slot_id] = path.stage
        elif kind == "decision_deadline_missed":
            self.deadline_misses += 1
        elif kind == "controller_failed":
            self.controller_failures += 1
        if kind in BUS_EVENTS:
            self.bus = "ok" if kind == "emergency_channel_recovered" else str(kind).replace("_", " ")
        if kind in BUS_EVENTS or kind in ("rollback", "emergency_halt", "controller_failed"):
            self.trainer_events.append(event)

    def add_decision(self, record: dict[str, Any]) -> None:
        self.decisions.append(record)
        self.decision_count += 1
        if not record.get("accepted", True):
            self.rejected += 1


class RunFollower:
    """Reads one run directory into a `LiveState`, a little more at every `poll()`."""

    def __init__(self, path: Path) -> None:
        if not is_run_dir(path):
            raise RunReadError(path, "not a run directory (no metrics.jsonl or config.json)")
        self.path = path
        self._start()

    def _start(self) -> None:
        self.state = LiveState()
        self._metrics = JsonlTail(self.path / "metrics.jsonl")
        self._events = JsonlTail(self.path / "events.jsonl")
        self._decisions = JsonlTail(self.path / "decisions.jsonl")

    def poll(self) -> LiveState:
        """Read what was written since the last poll (from the start again after a log was cut back)."""
        metrics, events, decisions = (t.read_new() for t in (self._metrics, self._events, self._decisions))
        if any(t.reset for t in (self._metrics, self._events, self._decisions)):
            self._start()
            return self.poll()
        state = self.state
        for record in metrics:
            state.add_metric(record)
        for event in events:
            state.add_event(event)
        for decision in decisions:
            state.add_decision(decision)
        state.outbox = outbox_counts(self.path)
        state.status = run_status(self.path)
        config = read_json(self.path / "config.json") or {}
        state.run_id = str(config.get("training_run_id") or self.path.name)
        return state


def _figure(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "-"


class WatchApp(App[None]):
    """The live view of one run."""

    TITLE = "esper watch"
    CSS = """
    #curves { height: auto; }
    .curve-box { width: 1fr; height: auto; border: round $primary; padding: 0 1; }
    .curve-box Sparkline { height: 3; }
    #health { width: 44; height: auto; border: round $accent; padding: 0 1; }
    DataTable { height: auto; max-height: 14; border: round $primary; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "quit"),
        Binding("r", "refresh_now", "refresh"),
    ]

    def __init__(self, run_dir: Path, *, interval_s: float = 1.0) -> None:
        super().__init__()
        self.follower = RunFollower(run_dir)
        self.interval_s = interval_s

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="curves"):
            with Vertical(classes="curve-box"):
                yield Static(id="accuracy-label")
                yield Sparkline([], id="accuracy")
                yield Static(id="loss-label")
                yield Sparkline([], id="loss")
                yield Static(id="training-loss-label")
                yield Sparkline([], id="training-loss")
                yield Static(id="parameters-label")
                yield Sparkline([], id="parameters")
            yield Static(id="health")
        yield DataTable(id="lifecycles", cursor_type="none")
        yield DataTable(id="decisions", cursor_type="none")
        yield Footer()

    def on_mount(self) -> None:
        lifecycles = self.query_one("#lifecycles", DataTable)
        lifecycles.add_columns("slot", "seed", "stage", "path (stage@step)", "last reason")
        lifecycles.border_title = "lifecycles"
        decisions = self.query_one("#decisions", DataTable)
        decisions.add_columns("step", "command", "target", "accepted", "reason")
        decisions.border_title = "last decisions"
        self.refresh_view()
        self.set_interval(self.interval_s, self.refresh_view)

    def action_refresh_now(self) -> None:
        self.refresh_view()

    def refresh_view(self) -> None:
        """Poll the run's files and redraw."""
        state = self.follower.poll()
        status, reason = state.status
        self.sub_title = f"{state.run_id}: {status}" + (f" ({reason})" if reason else "")
        evaluations = state.evaluations
        last = evaluations[-1] if evaluations else {}
        curves = {
            "accuracy": ("validation accuracy", "validation_accuracy", 4),
            "loss": ("validation loss", "validation_loss", 4),
            "training-loss": ("training loss", "training_loss", 4),
            "parameters": ("parameters", "parameters", 0),
        }
        for widget_id, (label, key, digits) in curves.items():
            values = [float(r[key]) for r in evaluations if isinstance(r.get(key), int | float)]
            self.query_one(f"#{widget_id}", Sparkline).data = values
            shown = _figure(last.get(key), digits)
            if key == "validation_accuracy" and evaluations:
                best = max(values) if values else None
                shown += f"  best {_figure(best, digits)}"
            self.query_one(f"#{widget_id}-label", Static).update(f"{label}: {shown}")
        self.query_one("#health", Static).update(self._health(state))
        self._fill_lifecycles(state)
        self._fill_decisions(state)

    def _health(self, state: LiveState) -> str:
        last = state.evaluations[-1] if state.evaluations else {}
        reports = state.outbox.get("field_reports", {})
        decisions = state.outbox.get("decisions", {})
        lines = [
            f"step {last.get('step', '-')}  epoch {_figure(last.get('epoch'), 2)}",
            f"evaluations {len(state.evaluations)}",
            f"decisions {state.decision_count} (refused {state.rejected})",
            f"deadline misses {state.deadline_misses}",
            f"controller failures {state.controller_failures}",
            "field-report outbox: " + (", ".join(f"{k} {v}" for k, v in sorted(reports.items())) or "empty"),
            "decision outbox: " + (", ".join(f"{k} {v}" for k, v in sorted(decisions.items())) or "empty"),
            f"bus: {state.bus}",
        ]
        if state.final is not None:
            lines.append(f"final accuracy {_figure(state.final.get('validation_accuracy'))}")
        for event in state.trainer_events:
            lines.append(f"step {event.get('step')}: {event.get('kind')}")
        return "\n".join(lines)

    def _fill_lifecycles(self, state: LiveState) -> None:
        table = self.query_one("#lifecycles", DataTable)
        table.clear()
        with_seed = {path.slot_id for path in state.seeds.values()}
        for slot_id, stage in sorted(state.slot_stages.items()):
            if slot_id not in with_seed:
                table.add_row(slot_id, "-", stage, "", "")
        for path in state.seeds.values():
            route = " > ".join(f"{stage.lower()[:6]}@{step}" for stage, step in path.stages)
            table.add_row(path.slot_id, path.seed_id, path.stage, route, path.reason)

    def _fill_decisions(self, state: LiveState) -> None:
        table = self.query_one("#decisions", DataTable)
        table.clear()
        for record in reversed(state.decisions):
            annotations = record.get("annotations") or {}
            reason = str(annotations.get("reason") or record.get("detail") or "")
            if not record.get("accepted", True):
                reason = f"refused: {record.get('rejection', '')} {reason}".strip()
            table.add_row(
                str(record.get("step", "")),
                str(record.get("command_type", "")),
                str(record.get("target_seed_id") or "-"),
                "yes" if record.get("accepted", True) else "no",
                reason,
            )
