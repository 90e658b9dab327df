"""`esper simic report`: the learner's rounds, as recorded in `lineage.jsonl`, plotted as PNGs.

One figure per concern, each with one point per round that measured it (a PPO figure is absent from an
imitation round, and a figure recorded as null was not measured: both are gaps, never zeros):

- `critic.png`: the critic's explained variance (after the round, and of the refit when there was one);
- `entropy.png`: the total entropy and the entropy of every head;
- `kl.png`: approximate KL overall and per head, the action head's exact KL, and the clip fraction;
- `losses.png`: policy, value and behaviour-cloning losses (PPO) and the imitation loss.

Rendering uses matplotlib's Agg canvas directly (no display, no global backend switch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from esper.simic.state import SimicState, SimicStateError

# file name -> (title, y label, metric names or prefixes ending in "."); a prefix plots every metric under it
PLOTS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "critic.png": (
        "Critic explained variance",
        "explained variance",
        ("ppo.explained_variance", "critic.refit_explained_variance"),
    ),
    "entropy.png": ("Entropy per head", "nats", ("ppo.entropy", "ppo.entropy.")),
    "kl.png": (
        "KL and clip fraction",
        "value",
        ("ppo.approx_kl", "ppo.action_kl", "ppo.kl.", "ppo.clip_fraction"),
    ),
    "losses.png": (
        "Losses",
        "loss",
        ("ppo.policy_loss", "ppo.value_loss", "ppo.bc_loss", "imitation.loss", "imitation.value_loss"),
    ),
}


def _series(rounds: Sequence[dict[str, Any]], names: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    """Metric name -> (round index, value) for every round that measured it (finite values only)."""
    found: dict[str, list[tuple[int, float]]] = {}
    for index, record in enumerate(rounds):
        for key, value in (record.get("metrics") or {}).items():
            wanted = any(key == name or (name.endswith(".") and key.startswith(name)) for name in names)
            if wanted and isinstance(value, int | float) and math.isfinite(value):
                found.setdefault(key, []).append((index, float(value)))
    return found


def write_simic_report(state: SimicState, out: Path) -> list[Path]:
    """Write the PNGs of `PLOTS` for the rounds `state` recorded into `out`; returns their paths.

    `SimicStateError` when there is no round to plot."""
    rounds = state.rounds()
    if not rounds:
        raise SimicStateError(f"{state.lineage_path} records no round: nothing to plot")
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    labels = [f"{index}:{record.get('mode', '?')}" for index, record in enumerate(rounds)]
    for name, (title, ylabel, metrics) in PLOTS.items():
        figure = Figure(figsize=(8, 4.5))
        FigureCanvasAgg(figure)
        axes = figure.add_subplot(1, 1, 1)
        series = _series(rounds, metrics)
        for key, points in sorted(series.items()):
            xs, ys = zip(*points, strict=True)
            axes.plot(xs, ys, marker="o", label=key)
        if not series:
            axes.text(
                0.5, 0.5, "not measured in any round", ha="center", va="center", transform=axes.transAxes
            )
        axes.set_title(f"{title} ({len(rounds)} rounds)")
        axes.set_xlabel("round")
        axes.set_ylabel(ylabel)
        axes.set_xticks(range(len(rounds)), labels, rotation=45, ha="right", fontsize=7)
        if series:
            axes.legend(fontsize=7, loc="best")
        figure.tight_layout()
        path = out / name
        figure.savefig(path, dpi=100)
        written.append(path)
    return written
