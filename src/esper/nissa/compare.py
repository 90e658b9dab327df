"""Runs side by side: a table of their figures and plots of accuracy against size and growth over time.

Plots are rendered on matplotlib's Agg canvas directly (no display, no global backend switch). Training
FLOPs are not recorded by runs today; the FLOPs plot is then not drawn and `ComparisonFiles.notes` says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from esper.nissa.runs import GROWTH_STAGES, RunData, growth_steps

STAGE_MARKERS = {"GERMINATED": ("^", "#3182bd"), "FOSSILIZED": ("o", "#31a354"), "CULLED": ("x", "#de2d26")}
COLUMNS = ("run", "status", "task", "host", "policy", "accuracy", "best", "params", "growth", "steps")


@dataclass(frozen=True)
class ComparisonFiles:
    """The plots written, and what could not be drawn and why."""

    images: tuple[Path, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)


def _fmt_float(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


def comparison_rows(runs: list[RunData]) -> list[dict[str, str]]:
    """One row of figures per run, as text."""
    rows = []
    for run in runs:
        info = run.info
        accuracies = [float(r["validation_accuracy"]) for r in run.evaluations]
        growth = len([e for e in growth_steps(run.events) if e.get("to_stage") == "GERMINATED"])
        params = (
            f"{info.params_initial}->{info.params_final}"
            if info.params_initial is not None and info.params_final != info.params_initial
            else str(info.params_final if info.params_final is not None else "-")
        )
        rows.append(
            {
                "run": info.run_id,
                "status": info.status,
                "task": info.task or "-",
                "host": info.host or "-",
                "policy": info.policy or "-",
                "accuracy": _fmt_float(info.final_accuracy),
                "best": _fmt_float(max(accuracies) if accuracies else None),
                "params": params,
                "growth": str(growth),
                "steps": str(info.steps if info.steps is not None else "-"),
            }
        )
    return rows


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _legend_outside(axes: Any) -> None:
    """The legend to the right of the axes, where it cannot cover data."""
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", borderaxespad=0)


def plot_accuracy_vs_parameters(runs: list[RunData], path: Path) -> None:
    """Each run's path through (parameters, validation accuracy), its start and end marked."""
    figure = _figure(8, 4.5)
    axes = figure.add_subplot()
    for run in runs:
        points = [(int(r["parameters"]), float(r["validation_accuracy"])) for r in run.evaluations]
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        (line,) = axes.plot(xs, ys, marker=".", lw=1, label=run.info.run_id)
        axes.plot(xs[0], ys[0], marker="s", color=line.get_color(), ls="none")
        axes.plot(xs[-1], ys[-1], marker="*", ms=10, color=line.get_color(), ls="none")
    axes.set_xlabel("parameters")
    axes.set_ylabel("validation accuracy")
    axes.set_title("accuracy against parameters (square: start, star: last evaluation)")
    _legend_outside(axes)
    figure.savefig(path)


def plot_growth_timeline(runs: list[RunData], path: Path) -> None:
    """One row per run: germinations, fossilisations and culls at their training step."""
    figure = _figure(8, 1.5 + 0.5 * max(1, len(runs)))
    axes = figure.add_subplot()
    for stage in GROWTH_STAGES:
        marker, colour = STAGE_MARKERS[stage]
        xs, ys = [], []
        for row, run in enumerate(runs):
            for event in growth_steps(run.events):
                if event.get("to_stage") == stage:
                    xs.append(int(event["step"]))
                    ys.append(row)
        if xs:
            axes.scatter(xs, ys, marker=marker, color=colour, label=stage.lower(), zorder=3)
    axes.set_yticks(range(len(runs)), [run.info.run_id for run in runs])
    axes.set_ylim(-0.5, len(runs) - 0.5)
    axes.invert_yaxis()
    axes.grid(axis="x", ls=":", lw=0.5)
    axes.set_xlabel("training step")
    axes.set_title("growth timeline")
    _legend_outside(axes)
    figure.savefig(path)


def write_comparison(runs: list[RunData], out: Path) -> ComparisonFiles:
    """Write the comparison plots into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    images = [out / "accuracy_vs_parameters.png", out / "growth_timeline.png"]
    plot_accuracy_vs_parameters(runs, images[0])
    plot_growth_timeline(runs, images[1])
    notes = []
    flops = [r for run in runs for r in run.evaluations if "training_flops" in r]
    if flops:
        figure = _figure(8, 4.5)
        axes = figure.add_subplot()
        for run in runs:
            points = [
                (float(r["training_flops"]), float(r["validation_accuracy"]))
                for r in run.evaluations
                if "training_flops" in r
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                axes.plot(xs, ys, marker=".", label=run.info.run_id)
        axes.set_xlabel("training FLOPs")
        axes.set_ylabel("validation accuracy")
        _legend_outside(axes)
        images.append(out / "accuracy_vs_flops.png")
        figure.savefig(images[-1])
    else:
        notes.append("accuracy against training FLOPs not drawn: these runs did not record training FLOPs")
    return ComparisonFiles(images=tuple(images), notes=tuple(notes))
