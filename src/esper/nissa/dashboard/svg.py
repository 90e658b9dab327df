"""Charts as inline SVG, rendered on the server: line and step charts, scatter rows, lifecycle bars.

Each chart is a `<svg>` string with its own axes and ticks; legends are drawn below the plot area, never
over the data. Every series is a `<path class="series">` (or `<circle>`/`<rect>` marks) carrying a
`data-series` attribute, so a test can find the curves in the page's DOM.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

PALETTE = ("#3182bd", "#e6550d", "#31a354", "#756bb1", "#636363", "#d6616b", "#8c6d31", "#17becf")
WIDTH, HEIGHT = 720, 260
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 28, 40


@dataclass(frozen=True)
class Series:
    """One named curve (or set of marks)."""

    name: str
    points: Sequence[tuple[float, float]]
    colour: str = ""
    dashed: bool = False
    marker: str = ""  # "" for a line, "circle" / "triangle" / "cross" for marks only


@dataclass(frozen=True)
class Chart:
    """What to draw."""

    title: str
    x_label: str
    y_label: str
    series: Sequence[Series]
    step: bool = False
    y_ticks: Sequence[tuple[float, str]] = field(default_factory=tuple)  # fixed ticks (row charts)
    vertical_marks: Sequence[tuple[float, str, str]] = field(default_factory=tuple)  # x, label, colour


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high]."""
    if not math.isfinite(low) or not math.isfinite(high):
        return []
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = min((m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw), default=raw)
    first = math.floor(low / step) * step
    ticks: list[float] = []
    value = first
    while not ticks or ticks[-1] < high - step * 1e-9:  # the last tick at or beyond `high`
        ticks.append(round(value, 12))
        value += step
    return ticks


def _label(value: float) -> str:
    if abs(value) >= 10000:
        return f"{value:,.0f}"
    if value == int(value):
        return str(int(value))
    return f"{value:.3g}"


def render(chart: Chart, width: int = WIDTH, height: int = HEIGHT) -> str:  # noqa: C901 (one pass that lays out axes, series, markers and legend)
    """The chart as an `<svg>` element (with a legend row below it when there are several series)."""
    points = [p for s in chart.series for p in s.points]
    named = [s for s in chart.series if s.name]
    legend_rows = math.ceil(len(named) / 4) if len(named) > 1 or any(s.marker for s in named) else 0
    total_height = height + 18 * legend_rows
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{total_height}" '
        f'viewBox="0 0 {width} {total_height}" role="img" aria-label="{escape(chart.title)}">',
        f'<text x="{width / 2}" y="16" text-anchor="middle" class="title">{escape(chart.title)}</text>',
    ]
    widest = max((len(text) for _, text in chart.y_ticks), default=0)
    left = max(LEFT, int(12 + 6.5 * widest))
    plot_w, plot_h = width - left - RIGHT, height - TOP - BOTTOM
    if not points:
        parts.append(
            f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="empty">'
            "no data yet</text></svg>"
        )
        return "".join(parts)
    xs = [p[0] for p in points] + [m[0] for m in chart.vertical_marks]
    ys = [p[1] for p in points] + [t[0] for t in chart.y_ticks]
    x_ticks = nice_ticks(min(xs), max(xs))
    y_values = [t[0] for t in chart.y_ticks] or nice_ticks(min(ys), max(ys))
    x0, x1 = min(x_ticks[0], *xs), max(x_ticks[-1], *xs)
    y0, y1 = min(y_values[0], *ys), max(y_values[-1], *ys)
    if chart.y_ticks:
        y0, y1 = y0 - 0.5, y1 + 0.5
    x1 = x1 if x1 > x0 else x0 + 1
    y1 = y1 if y1 > y0 else y0 + 1

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def sy(y: float) -> float:
        return TOP + plot_h - (y - y0) / (y1 - y0) * plot_h

    parts.append(f'<rect x="{left}" y="{TOP}" width="{plot_w}" height="{plot_h}" class="frame"/>')
    for tick in x_ticks:
        parts.append(
            f'<line x1="{sx(tick):.1f}" y1="{TOP}" x2="{sx(tick):.1f}" y2="{TOP + plot_h}" class="grid"/>'
            f'<text x="{sx(tick):.1f}" y="{TOP + plot_h + 14}" text-anchor="middle">{_label(tick)}</text>'
        )
    y_labels = list(chart.y_ticks) or [(v, _label(v)) for v in y_values]
    for value, text in y_labels:
        parts.append(
            f'<line x1="{left}" y1="{sy(value):.1f}" x2="{left + plot_w}" y2="{sy(value):.1f}" class="grid"/>'
            f'<text x="{left - 4}" y="{sy(value) + 4:.1f}" text-anchor="end">{escape(text)}</text>'
        )
    parts.append(
        f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle">{escape(chart.x_label)}</text>'
        f'<text transform="translate(12 {TOP + plot_h / 2}) rotate(-90)" text-anchor="middle">'
        f"{escape(chart.y_label)}</text>"
    )
    for x, text, colour in chart.vertical_marks:
        parts.append(
            f'<line x1="{sx(x):.1f}" y1="{TOP}" x2="{sx(x):.1f}" y2="{TOP + plot_h}" stroke="{colour}" '
            f'class="mark"><title>{escape(text)}</title></line>'
        )
    for index, series in enumerate(chart.series):
        colour = series.colour or PALETTE[index % len(PALETTE)]
        name = escape(series.name)
        if series.marker:
            for x, y in series.points:
                parts.append(_marker(series.marker, sx(x), sy(y), colour, name))
            continue
        if not series.points:
            continue
        commands = []
        for i, (x, y) in enumerate(series.points):
            if i and chart.step:
                commands.append(f"H{sx(x):.1f}")
            commands.append(f"{'L' if i else 'M'}{sx(x):.1f},{sy(y):.1f}")
        dash = ' stroke-dasharray="5 3"' if series.dashed else ""
        parts.append(
            f'<path class="series" data-series="{name}" d="{" ".join(commands)}" stroke="{colour}"'
            f'{dash} fill="none"/>'
        )
    for index, series in enumerate(named if legend_rows else []):
        colour = series.colour or PALETTE[chart.series.index(series) % len(PALETTE)]
        lx = left + (index % 4) * (plot_w / 4)
        ly = height + 18 * (index // 4) + 4
        parts.append(
            f'<rect x="{lx:.1f}" y="{ly:.1f}" width="12" height="4" fill="{colour}"/>'
            f'<text x="{lx + 16:.1f}" y="{ly + 6:.1f}">{escape(series.name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _marker(kind: str, x: float, y: float, colour: str, name: str) -> str:
    if kind == "triangle":
        return (
            f'<path class="marker" data-series="{name}" d="M{x:.1f},{y - 6:.1f} L{x - 5:.1f},{y + 4:.1f} '
            f'L{x + 5:.1f},{y + 4:.1f} Z" fill="{colour}"/>'
        )
    if kind == "cross":
        return (
            f'<path class="marker" data-series="{name}" d="M{x - 4:.1f},{y - 4:.1f} L{x + 4:.1f},{y + 4:.1f} '
            f'M{x - 4:.1f},{y + 4:.1f} L{x + 4:.1f},{y - 4:.1f}" stroke="{colour}" stroke-width="2"/>'
        )
    return f'<circle class="marker" data-series="{name}" cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{colour}"/>'


def lifecycle(rows: Sequence[tuple[str, Sequence[tuple[float, float, str, str]]]], title: str) -> str:
    """One bar row per slot; each span (start, end, stage, colour) a rectangle with the stage as tooltip."""
    width = WIDTH
    height = TOP + 24 * max(1, len(rows)) + BOTTOM
    spans = [s for _, row in rows for s in row]
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
        f'<text x="{width / 2}" y="16" text-anchor="middle" class="title">{escape(title)}</text>',
    ]
    if not spans:
        parts.append(
            f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no slot recorded</text></svg>'
        )
        return "".join(parts)
    x_ticks = nice_ticks(0, max(s[1] for s in spans))
    x1 = max(x_ticks[-1], *(s[1] for s in spans), 1.0)
    plot_w = width - LEFT - RIGHT

    def sx(x: float) -> float:
        return LEFT + x / x1 * plot_w

    for tick in x_ticks:
        parts.append(
            f'<text x="{sx(tick):.1f}" y="{height - BOTTOM + 14}" text-anchor="middle">{_label(tick)}</text>'
        )
    for index, (label, row) in enumerate(rows):
        y = TOP + 24 * index
        parts.append(f'<text x="{LEFT - 4}" y="{y + 15}" text-anchor="end">{escape(label)}</text>')
        for start, end, stage, colour in row:
            parts.append(
                f'<rect class="span" data-stage="{escape(stage)}" x="{sx(start):.1f}" y="{y + 2}" '
                f'width="{max(sx(end) - sx(start), 1.0):.1f}" height="18" fill="{colour}" stroke="#444" '
                f'stroke-width="0.3"><title>{escape(label)}: {escape(stage)} {start:g}-{end:g}</title></rect>'
            )
    parts.append(
        f'<text x="{LEFT + plot_w / 2}" y="{height - 6}" text-anchor="middle">training step</text></svg>'
    )
    return "".join(parts)
