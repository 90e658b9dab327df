"""The run report (Nissa's): a run directory rendered as plots and a short markdown page, written into
the run dir.

`write_report(run_dir)` reads `metrics.jsonl`, `events.jsonl`, and `summary.json` / `config.json` when they
exist, and writes `report/accuracy.png` (validation accuracy and loss over training steps, lifecycle
commands marked, and the training loss), `report/accuracy_vs_parameters.png` (did growth pay?),
`report/parameters.png` (parameter count over steps, changing at the event that changed it),
`report/lifecycle.png` (one row per slot, coloured by stage over time, each seed named with its
blueprint) and `report/report.md` that shows them with the summary and a timeline of every seed. Missing
data is shown as missing, never as zero: a run without a summary (still running, killed or halted) says
so. Rendering uses matplotlib's Agg canvas directly, so no display and no global backend switch are
needed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from esper.leyline import EsperError
from esper.nissa.layout import REPORT_PAGE, RunLayout

# One colour per stage; the active path goes from cool to warm, retirement in greys.
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
# Trainer events worth a line in the report.
TRAINER_EVENTS = (
    "rollback",
    "emergency_halt",
    "emergency_broadcast",
    "emergency_channel_unavailable",
    "emergency_channel_recovered",
    "controller_failed",
)
_MARKED_STAGES = ("GERMINATED", "FOSSILIZED", "CULLED")


class ReportError(EsperError):
    """A run directory cannot be rendered (missing, or a log that does not parse)."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"cannot report on {path}: {reason}")


@dataclass(frozen=True)
class Segment:
    """A slot in one stage from `start` (inclusive) to `end` (exclusive), in training steps."""

    slot_id: str
    seed_id: str
    stage: str
    start: int
    end: int


@dataclass
class RunRecord:
    """What the report reads from a run directory."""

    root: Path
    metrics: list[dict[str, Any]]
    events: list[dict[str, Any]]
    summary: dict[str, Any] | None
    config: dict[str, Any] | None
    slots: list[str] = field(default_factory=list)

    @property
    def last_step(self) -> int:
        """The furthest step any log reached."""
        steps = [int(r["step"]) for r in self.metrics] + [int(e["step"]) for e in self.events]
        if self.summary is not None and isinstance(self.summary.get("steps"), int):
            steps.append(int(self.summary["steps"]))
        return max(steps, default=0)


@dataclass(frozen=True)
class ReportFiles:
    """Where the report was written."""

    markdown: Path
    images: tuple[Path, ...]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ReportError(path, f"line {number} is not JSON: {exc}") from exc
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ReportError(path, f"line {number} is not a record with an integer step")
        records.append(record)
    return records


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ReportError(path, f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ReportError(path, "not a JSON object")
    return data


def read_run(run_dir: Path) -> RunRecord:
    """Load a run directory's logs; a directory without `metrics.jsonl` is not a run."""
    layout = RunLayout(run_dir)
    if not run_dir.is_dir():
        raise ReportError(run_dir, "no such directory")
    if not layout.metrics.exists():
        raise ReportError(run_dir, f"no {layout.metrics.name}: not a run directory")
    metrics = [r for r in _read_jsonl(layout.metrics) if "validation_accuracy" in r]
    record = RunRecord(
        root=run_dir,
        metrics=sorted(metrics, key=lambda r: (int(r["step"]), bool(r.get("final")))),
        events=_read_jsonl(layout.events),
        summary=_read_json(layout.summary),
        config=_read_json(layout.config),
    )
    slots: list[str] = []
    for metric in record.metrics:
        for slot_id in metric.get("stages", {}):
            if slot_id not in slots:
                slots.append(slot_id)
    for event in record.events:
        slot_id = event.get("slot_id")
        if event.get("kind") == "transition" and slot_id and slot_id not in slots:
            slots.append(str(slot_id))
    record.slots = slots
    return record


def lifecycle_segments(record: RunRecord) -> list[Segment]:
    """Each slot's stages over time, from its transition events (DORMANT until the first one)."""
    end_step = record.last_step
    segments: list[Segment] = []
    for slot_id in record.slots:
        transitions = [
            e for e in record.events if e.get("kind") == "transition" and e.get("slot_id") == slot_id
        ]
        stage, seed_id, start = "DORMANT", slot_id, 0
        for event in transitions:
            step = int(event["step"])
            if step > start or (step == start and stage != "DORMANT"):
                segments.append(Segment(slot_id, seed_id, stage, start, step))
            stage, seed_id, start = str(event["to_stage"]), str(event.get("seed_id", seed_id)), step
        segments.append(Segment(slot_id, seed_id, stage, start, max(end_step, start)))
    return segments


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)  # attaches itself: savefig renders with Agg, whatever pyplot's backend is
    return figure


def _no_data(figure: Figure, message: str) -> None:
    axes = figure.add_subplot()
    axes.text(0.5, 0.5, message, ha="center", va="center", transform=axes.transAxes)
    axes.set_axis_off()


def plot_accuracy(record: RunRecord, path: Path) -> None:
    """Validation accuracy and loss over steps, with germinations, fossilisations and culls marked."""
    figure = _figure(8, 4)
    points = [r for r in record.metrics if not r.get("final")]
    if not points:
        _no_data(figure, "no evaluation recorded")
    else:
        steps = [int(r["step"]) for r in points]
        axes = figure.add_subplot()
        axes.plot(
            steps, [float(r["validation_accuracy"]) for r in points], color="#3182bd", label="val accuracy"
        )
        axes.set_xlabel("training step")
        axes.set_ylabel("validation accuracy")
        loss_axes = axes.twinx()
        loss_axes.plot(
            steps, [float(r["validation_loss"]) for r in points], color="#969696", ls="--", label="val loss"
        )
        trained = [r for r in points if isinstance(r.get("training_loss"), int | float)]
        if trained:
            loss_axes.plot(
                [int(r["step"]) for r in trained],
                [float(r["training_loss"]) for r in trained],
                color="#e6550d",
                lw=1,
                label="training loss",
            )
        loss_axes.set_ylabel("loss")
        for stage in _MARKED_STAGES:
            marks = [
                int(e["step"])
                for e in record.events
                if e.get("kind") == "transition" and e["to_stage"] == stage
            ]
            for index, step in enumerate(marks):
                label = stage.lower() if index == 0 else None
                axes.axvline(step, color=STAGE_COLOURS[stage], ls=":", lw=1.5, label=label)
        handles, labels = axes.get_legend_handles_labels()
        loss_handles, loss_labels = loss_axes.get_legend_handles_labels()
        axes.legend(  # to the right of the plot: a legend inside covered the loss curve
            handles + loss_handles,
            labels + loss_labels,
            loc="upper left",
            bbox_to_anchor=(1.12, 1.0),
            fontsize="small",
        )
        axes.set_title("validation accuracy, validation and training loss")
    figure.savefig(path)


def parameter_steps(record: RunRecord) -> list[tuple[int, int]]:
    """(step, parameters) at every evaluation, plus a point at the lifecycle event that changed the count:
    an evaluation only sees a change after it happened, so the change moves back to the last transition
    since the previous evaluation (the plot's steps then line up with the events)."""
    counted = [
        (int(r["step"]), int(r["parameters"])) for r in record.metrics if isinstance(r.get("parameters"), int)
    ]
    moves = sorted(int(e["step"]) for e in record.events if e.get("kind") == "transition")
    points: list[tuple[int, int]] = []
    for index, (step, parameters) in enumerate(counted):
        if index and parameters != counted[index - 1][1]:
            previous = counted[index - 1][0]
            cause = [m for m in moves if previous < m <= step]
            if cause and cause[-1] < step:
                points.append((cause[-1], parameters))
        points.append((step, parameters))
    return points


def plot_parameters(record: RunRecord, path: Path) -> None:
    """The model's parameter count (host and seeds), changing at the lifecycle event that changed it."""
    figure = _figure(8, 3)
    points = parameter_steps(record)
    if not points:
        _no_data(figure, "no parameter count recorded")
    else:
        axes = figure.add_subplot()
        axes.step([p[0] for p in points], [p[1] for p in points], where="post", color="#31a354")
        axes.set_xlabel("training step")
        axes.set_ylabel("parameters")
        axes.set_title("parameter count")
    figure.savefig(path)


def plot_lifecycle(record: RunRecord, segments: list[Segment], path: Path) -> None:
    """One row per slot, each stage a coloured span of steps."""
    figure = _figure(8, 1.2 + 0.5 * max(1, len(record.slots)))
    if not record.slots:
        _no_data(figure, "no slot recorded")
    else:
        axes = figure.add_subplot()
        rows = {slot_id: index for index, slot_id in enumerate(record.slots)}
        for segment in segments:
            width = max(segment.end - segment.start, 0.5)
            axes.barh(
                rows[segment.slot_id],
                width,
                left=segment.start,
                color=STAGE_COLOURS.get(segment.stage, "#ffffff"),
                edgecolor="#444444",
                linewidth=0.3,
            )
        for segment in segments:
            if segment.stage == "GERMINATED" or (
                segment.stage == "TRAINING" and segment.seed_id != segment.slot_id
            ):
                axes.annotate(  # the operation: which seed, of which blueprint, started here
                    operation_name(record, segment.seed_id),
                    (segment.start, rows[segment.slot_id]),
                    xytext=(2, 9),
                    textcoords="offset points",
                    fontsize="x-small",
                )
        axes.set_yticks(range(len(record.slots)), [f"slot {s}" for s in record.slots])
        axes.invert_yaxis()
        axes.set_xlabel("training step")
        axes.set_title("slot lifecycles")
        seen = [s for s in STAGE_COLOURS if any(seg.stage == s for seg in segments)]
        figure.legend(  # below the axes and their label, laid out by the figure: it covers nothing
            handles=[Patch(color=STAGE_COLOURS[s], label=s.lower()) for s in seen],
            loc="outside lower center",
            ncol=min(7, len(seen)),
            fontsize="small",
        )
    figure.savefig(path)


def operation_name(record: RunRecord, seed_id: str) -> str:
    """A seed as "<seed id> <blueprint>", the blueprint read from its germination's reason."""
    for event in record.events:
        reason = str(event.get("reason", ""))
        if event.get("seed_id") == seed_id and reason.startswith("blueprint "):
            return f"{seed_id} {reason.removeprefix('blueprint ').split(',')[0]}"
    return seed_id


def plot_accuracy_parameters(record: RunRecord, path: Path) -> None:
    """Validation accuracy against the parameter count, the start (before any growth) marked."""
    figure = _figure(8, 4)
    points = [
        (int(r["parameters"]), float(r["validation_accuracy"]))
        for r in record.metrics
        if not r.get("final") and isinstance(r.get("parameters"), int)
    ]
    if not points:
        _no_data(figure, "no evaluation recorded")
    else:
        axes = figure.add_subplot()
        axes.plot([p[0] for p in points], [p[1] for p in points], marker=".", color="#3182bd", label="run")
        start = [p for p in points if p[0] == points[0][0]]
        axes.plot([p[0] for p in start], [p[1] for p in start], "s", color="#969696", label="before growth")
        axes.plot(*points[-1], "*", ms=12, color="#31a354", label="last evaluation")
        axes.set_xlabel("parameters")
        axes.set_ylabel("validation accuracy")
        axes.set_title("did growth pay? accuracy against parameters")
        axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
    figure.savefig(path)


def _fmt(value: Any) -> str:
    if value is None:
        return "missing"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items()) or "none"
    return str(value)


def render_markdown(record: RunRecord, segments: list[Segment], images: dict[str, str]) -> str:
    """The report page: summary figures, the plots, each seed's path and the trainer's notable events."""
    summary = record.summary
    run_id = (summary or {}).get("run_id") or (record.config or {}).get("training_run_id") or record.root.name
    lines = [f"# Esper run report: {run_id}", ""]
    if summary is None:
        lines += ["**No summary.json: the run has not finished (still running, killed, or failed).**", ""]
    else:
        if summary.get("status") == "halted":
            halt = summary.get("halt") or {}
            lines += [
                f"**Halted by an emergency signal from {halt.get('origin')}: {halt.get('reason')}**",
                "",
            ]
        lines += ["| figure | value |", "|---|---|"]
        for key in (
            "task",
            "host",
            "policy",
            "status",
            "epochs",
            "steps",
            "final_val_accuracy",
            "best_val_accuracy",
            "params_initial",
            "params_final",
            "max_params",
            "seeds_germinated",
            "seeds_fossilized",
            "seeds_culled",
            "rollbacks",
            "decisions",
            "wall_seconds",
            "transitions",
        ):
            value = summary.get(key)
            shown = "unbounded" if key == "max_params" and value is None else _fmt(value)
            lines.append(f"| {key} | {shown} |")
        lines.append("")
    for title, name in (
        ("Accuracy", "accuracy"),
        ("Accuracy against parameters", "accuracy_vs_parameters"),
        ("Parameters", "parameters"),
        ("Lifecycle", "lifecycle"),
    ):
        lines += [f"## {title}", "", f"![{name}]({images[name]})", ""]
    lines += _growth_step_lines(summary)
    lines += ["## Seeds", ""]
    seeds: dict[tuple[str, str], list[Segment]] = {}
    for segment in segments:
        if segment.seed_id != segment.slot_id:
            seeds.setdefault((segment.slot_id, segment.seed_id), []).append(segment)
    if not seeds:
        lines += ["No seed was germinated.", ""]
    for (slot_id, seed_id), path in seeds.items():
        stages = " → ".join(f"{s.stage} ({s.start})" for s in path)
        lines.append(f"- `{seed_id}` in slot `{slot_id}`: {stages}")
    lines.append("")
    notable = [e for e in record.events if e.get("kind") in TRAINER_EVENTS]
    lines += ["## Trainer events", ""]
    if not notable:
        lines.append("None.")
    for event in notable:
        lines.append(f"- step {event['step']}: {event['kind']}: {event.get('reason', '')}")
    lines.append("")
    return "\n".join(lines)


def _growth_step_lines(summary: dict[str, Any] | None) -> list[str]:
    """The table of growth steps: size and validation accuracy before and after each growth."""
    steps = (summary or {}).get("growth_steps")
    if steps is None:
        return []
    lines = ["## Growth steps", ""]
    if not steps:
        return [*lines, "The model did not grow.", ""]
    lines += [
        "| step | operation | target | outcome | params before → after | accuracy before → after |",
        "|---|---|---|---|---|---|",
    ]
    for entry in steps:
        lines.append(
            f"| {entry['step']} | {entry['operation']} | `{entry['target']}` | {entry['outcome']} | "
            f"{_fmt(entry['params_before'])} → {_fmt(entry['params_after'])} | "
            f"{_fmt(entry['accuracy_before'])} → {_fmt(entry['accuracy_after'])} |"
        )
    return [*lines, ""]


def write_report(run_dir: Path) -> ReportFiles:
    """Render `run_dir` into `run_dir/report/` and return the files written."""
    record = read_run(run_dir)
    out = RunLayout(run_dir).report
    out.mkdir(exist_ok=True)
    segments = lifecycle_segments(record)
    images = {
        name: f"{name}.png" for name in ("accuracy", "accuracy_vs_parameters", "parameters", "lifecycle")
    }
    plot_accuracy(record, out / images["accuracy"])
    plot_accuracy_parameters(record, out / images["accuracy_vs_parameters"])
    plot_parameters(record, out / images["parameters"])
    plot_lifecycle(record, segments, out / images["lifecycle"])
    markdown = out / REPORT_PAGE
    markdown.write_text(render_markdown(record, segments, images), encoding="utf-8")
    return ReportFiles(markdown=markdown, images=tuple(out / name for name in images.values()))
