"""The dashboard's pages as HTML strings, read from the run files at each request."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

from esper.leyline import EsperError
from esper.nissa.compare import COLUMNS, STAGE_MARKERS, comparison_rows
from esper.nissa.dashboard.svg import Chart, Series, lifecycle, render
from esper.nissa.runs import (
    GROWTH_STAGES,
    STAGE_COLOURS,
    RunData,
    find_runs,
    growth_steps,
    lifecycle_spans,
    load_run,
    outbox_counts,
    parameter_points,
    resolve_run,
    run_info,
)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1100px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.7em; text-align: left; font-size: 0.9em; }
th { background: #f4f4f4; }
.chart { display: block; margin: 0.5em 0 1em; font-size: 11px; }
.chart .title { font-size: 13px; font-weight: 600; }
.chart .frame { fill: none; stroke: #999; }
.chart .grid { stroke: #eee; }
.chart .series { stroke-width: 2; }
.chart .mark { stroke-dasharray: 2 3; stroke-width: 1.5; }
.status-running { color: #3182bd; } .status-failed { color: #de2d26; } .status-halted { color: #e6550d; }
.status-completed { color: #31a354; }
nav a { margin-right: 1em; }
"""


def _page(title: str, body: str, *, refresh_s: int | None = None) -> str:
    refresh = f'<meta http-equiv="refresh" content="{refresh_s}">' if refresh_s else ""
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">{refresh}'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>"
        f'<nav><a href="/">runs</a></nav><h1>{escape(title)}</h1>{body}</body></html>'
    )


def error_page(message: str) -> str:
    return _page("not found", f"<p>{escape(message)}</p>")


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]], *, raw: int = -1) -> str:
    """An HTML table; column `raw` holds markup already escaped."""
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{v if i == raw else escape(v)}</td>" for i, v in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "-" if value is None else str(value)


def run_list_page(root: Path) -> str:
    """Every run with its status; tick runs to compare them."""
    infos = [run_info(path) for path in find_runs(root)] if root.is_dir() else []
    rows = []
    for info in reversed(infos):
        name = quote(info.path.name)
        status = f'<span class="status-{escape(info.status)}">{escape(info.status)}</span>'
        if info.reason:
            status += f" ({escape(info.reason)})"
        rows.append(
            [
                f'<input type="checkbox" name="run" value="{escape(info.path.name)}"> '
                f'<a href="/runs/{name}">{escape(info.run_id)}</a><br>{status}',
                info.started_at.strftime("%Y-%m-%d %H:%M") if info.started_at else "-",
                info.task or "-",
                info.host or "-",
                _fmt(info.final_accuracy),
                _fmt(info.params_initial) + " → " + _fmt(info.params_final),
            ]
        )
    table = _table(["run", "started", "task", "host", "accuracy", "parameters"], rows, raw=0)
    body = (
        f"<p>{len(infos)} run(s) in {escape(str(root))}</p>"
        f'<form action="/compare" method="get">{table}<button type="submit">compare</button></form>'
    )
    return _page("Esper runs", body)


def _growth_marks(run: RunData) -> list[tuple[float, str, str]]:
    return [
        (
            float(e["step"]),
            f"step {e['step']}: {e.get('seed_id')} {e.get('to_stage')}",
            STAGE_COLOURS[e["to_stage"]],
        )
        for e in growth_steps(run.events)
        if e.get("to_stage") in STAGE_COLOURS
    ]


def run_charts(run: RunData) -> str:
    """The run's curves: accuracy, losses, parameters (growth marked) and the slot lifecycles."""
    points = run.evaluations

    def series(key: str) -> list[tuple[float, float]]:
        return [(float(r["step"]), float(r[key])) for r in points if isinstance(r.get(key), int | float)]

    marks = _growth_marks(run)
    charts = [
        Chart(
            "validation accuracy",
            "training step",
            "accuracy",
            [Series("validation accuracy", series("validation_accuracy"))],
            vertical_marks=marks,
        ),
        Chart(
            "loss",
            "training step",
            "loss",
            [
                Series("training loss", series("training_loss"), colour="#e6550d"),
                Series("validation loss", series("validation_loss"), colour="#636363", dashed=True),
            ],
            vertical_marks=marks,
        ),
        Chart(
            "parameters",
            "training step",
            "parameters",
            [
                Series(
                    "parameters", [(float(x), float(y)) for x, y in parameter_points(run)], colour="#31a354"
                )
            ],
            step=True,
            vertical_marks=marks,
        ),
    ]
    html = "".join(render(chart) for chart in charts)
    rows = []
    for slot_id, spans in lifecycle_spans(run).items():
        rows.append(
            (
                slot_id,
                [
                    (
                        float(s.start),
                        float(s.end),
                        f"{s.stage} {s.seed_id}".strip(),
                        STAGE_COLOURS.get(s.stage, "#fff"),
                    )
                    for s in spans
                ],
            )
        )
    legend = " ".join(
        f'<span style="background:{c};padding:0 0.4em;border:1px solid #999">{s.lower()}</span>'
        for s, c in STAGE_COLOURS.items()
    )
    return html + lifecycle(rows, "slot lifecycles") + f"<p>{legend}</p>"


def run_page(root: Path, name: str, *, refresh_s: int = 5) -> str:
    """One run: its figures, curves, lifecycles, growth steps, last decisions and outbox."""
    run = load_run(resolve_run(name, root))
    info = run.info
    figures = [
        ("status", info.status + (f" ({info.reason})" if info.reason else "")),
        ("task", info.task or "-"),
        ("host", info.host or "-"),
        ("policy", info.policy or "-"),
        ("final accuracy", _fmt(info.final_accuracy)),
        ("parameters", f"{_fmt(info.params_initial)} → {_fmt(info.params_final)}"),
        ("steps", _fmt(info.steps)),
        ("deadline misses", str(sum(1 for e in run.events if e.get("kind") == "decision_deadline_missed"))),
    ]
    outbox = outbox_counts(run.path)
    for table, counts in outbox.items():
        figures.append(
            (f"{table} outbox", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "empty")
        )
    growth = [
        [
            str(e["step"]),
            str(e.get("slot_id")),
            str(e.get("seed_id")),
            str(e.get("to_stage")),
            str(e.get("reason", "")),
        ]
        for e in growth_steps(run.events)
    ]
    decisions = [
        [
            str(d.get("step")),
            str(d.get("command_type")),
            "yes" if d.get("accepted", True) else f"no: {d.get('rejection', '')}",
            str((d.get("annotations") or {}).get("reason", "")),
        ]
        for d in run.decisions[-15:][::-1]
    ]
    body = (
        _table(["figure", "value"], figures)
        + run_charts(run)
        + "<h2>Growth</h2>"
        + (_table(["step", "slot", "seed", "stage", "reason"], growth) if growth else "<p>No growth.</p>")
        + "<h2>Last decisions</h2>"
        + _table(["step", "command", "accepted", "reason"], decisions)
    )
    return _page(f"Run {info.run_id}", body, refresh_s=refresh_s if info.status == "running" else None)


def compare_page(root: Path, names: Sequence[str]) -> str:
    """Runs side by side: their figures, accuracy against parameters, and the growth timeline."""
    if not names:
        raise EsperError("no run to compare: tick runs on the run list")
    runs = [load_run(resolve_run(name, root)) for name in names]
    rows = [[row[c] for c in COLUMNS] for row in comparison_rows(runs)]
    scatter = Chart(
        "accuracy against parameters",
        "parameters",
        "validation accuracy",
        [
            Series(
                run.info.run_id,
                [(float(r["parameters"]), float(r["validation_accuracy"])) for r in run.evaluations],
            )
            for run in runs
        ],
    )
    timeline_series = []
    for stage in GROWTH_STAGES:
        marker, colour = STAGE_MARKERS[stage]
        points = [
            (float(e["step"]), float(index))
            for index, run in enumerate(runs)
            for e in growth_steps(run.events)
            if e.get("to_stage") == stage
        ]
        shape = {"^": "triangle", "o": "circle", "x": "cross"}[marker]
        timeline_series.append(Series(stage.lower(), points, colour=colour, marker=shape))
    timeline = Chart(
        "growth timeline",
        "training step",
        "",
        timeline_series,
        y_ticks=[(float(i), run.info.run_id) for i, run in enumerate(runs)],
    )
    accuracy = Chart(
        "validation accuracy",
        "training step",
        "accuracy",
        [
            Series(
                run.info.run_id,
                [(float(r["step"]), float(r["validation_accuracy"])) for r in run.evaluations],
            )
            for run in runs
        ],
    )
    body = (
        _table(list(COLUMNS), rows)
        + render(scatter)
        + render(accuracy)
        + render(timeline, height=80 + 30 * len(runs))
        + "<p>Accuracy against training FLOPs: not drawn, runs do not record training FLOPs.</p>"
    )
    return _page("Compare runs", body)
