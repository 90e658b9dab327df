"""`esper watch`: the Textual view of a run, driven headless by Textual's pilot."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from textual.widgets import DataTable, Sparkline, Static

from esper.nissa.runs import RunReadError
from esper.nissa.watch import RunFollower, WatchApp


def _cut(path: Path, keep: int) -> list[str]:
    """Keep the first `keep` lines of a log; return the lines cut off."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(lines[:keep]), encoding="utf-8")
    return lines[keep:]


@pytest.mark.slow
def test_the_view_shows_a_finished_runs_curves_lifecycles_decisions_and_health(runs_dir: Path) -> None:
    asyncio.run(_the_view_shows_a_finished_runs_curves_lifecycles_decisions_and_health(runs_dir))


async def _the_view_shows_a_finished_runs_curves_lifecycles_decisions_and_health(runs_dir: Path) -> None:
    run = runs_dir / "grown"
    app = WatchApp(run, interval_s=3600)
    async with app.run_test(size=(120, 48)) as pilot:
        await pilot.pause()
        assert len(app.query_one("#accuracy", Sparkline).data or []) > 5
        assert len(app.query_one("#parameters", Sparkline).data or []) > 5
        lifecycles = app.query_one("#lifecycles", DataTable)
        seeds = [lifecycles.get_row_at(i)[1] for i in range(lifecycles.row_count)]
        assert any(":" in str(seed) for seed in seeds)  # a seed id such as h2:g1
        decisions = app.query_one("#decisions", DataTable)
        assert 0 < decisions.row_count <= 12
        assert any("wait" in str(decisions.get_row_at(i)[4]) for i in range(decisions.row_count))
        health = str(app.query_one("#health", Static).render())
        summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
        assert f"deadline misses {summary['decision_deadline_misses']}" in health
        assert "field-report outbox: published" in health
        assert "completed" in app.sub_title


@pytest.mark.slow
def test_the_view_follows_the_run_files_as_they_grow(runs_dir: Path) -> None:
    asyncio.run(_the_view_follows_the_run_files_as_they_grow(runs_dir))


async def _the_view_follows_the_run_files_as_they_grow(runs_dir: Path) -> None:
    run = runs_dir / "grown"
    later_metrics = _cut(run / "metrics.jsonl", 2)
    later_events = _cut(run / "events.jsonl", 0)
    later_decisions = _cut(run / "decisions.jsonl", 1)
    app = WatchApp(run, interval_s=3600)
    async with app.run_test(size=(120, 48)) as pilot:
        await pilot.pause()
        assert len(app.query_one("#accuracy", Sparkline).data or []) == 2
        assert app.query_one("#decisions", DataTable).row_count == 1
        lifecycles = app.query_one("#lifecycles", DataTable)
        assert all(lifecycles.get_row_at(i)[1] == "-" for i in range(lifecycles.row_count))
        # The run writes on, the last line of a log only half written at first.
        with open(run / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write("".join(later_metrics[:3]) + later_metrics[3][:10])
        for name, lines in (("events", later_events), ("decisions", later_decisions)):
            with open(run / f"{name}.jsonl", "a", encoding="utf-8") as handle:
                handle.write("".join(lines))
        await pilot.press("r")
        await pilot.pause()
        assert len(app.query_one("#accuracy", Sparkline).data or []) == 5
        assert app.query_one("#decisions", DataTable).row_count > 1
        seeds = [lifecycles.get_row_at(i)[1] for i in range(lifecycles.row_count)]
        assert any(":" in str(seed) for seed in seeds)
        with open(run / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(later_metrics[3][10:])
        await pilot.press("r")
        await pilot.pause()
        assert len(app.query_one("#accuracy", Sparkline).data or []) == 6


def test_watching_a_folder_that_is_not_a_run_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RunReadError, match="not a run directory"):
        RunFollower(tmp_path)


@pytest.mark.slow
def test_a_screenshot_of_the_view_is_an_svg(runs_dir: Path, tmp_path: Path) -> None:
    asyncio.run(_a_screenshot_of_the_view_is_an_svg(runs_dir, tmp_path))


async def _a_screenshot_of_the_view_is_an_svg(runs_dir: Path, tmp_path: Path) -> None:
    app = WatchApp(runs_dir / "grown", interval_s=3600)
    async with app.run_test(size=(120, 48)) as pilot:
        await pilot.pause()
        path = app.save_screenshot(filename="watch.svg", path=str(tmp_path))
    assert Path(path).read_text(encoding="utf-8").lstrip().startswith("<svg")
