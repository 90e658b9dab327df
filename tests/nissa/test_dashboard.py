"""`esper dashboard` in headless Chromium: pages load, curves render, screenshots are not blank."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from PIL import Image

from esper.nissa.dashboard import create_app
from esper.nissa.dashboard.pages import run_page
from esper.nissa.dashboard.svg import nice_ticks
from esper.nissa.runs import run_info


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def dashboard(runs_dir: Path) -> Iterator[str]:
    """The dashboard of `runs_dir` served on a free loopback port; its base URL."""
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(runs_dir), host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:  # readiness, not a timing assertion
        assert thread.is_alive() and time.monotonic() < deadline, "the dashboard did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def _browser(chromium: str, tmp_path: Path, *args: str) -> str:
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        *args,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _screenshot(chromium: str, tmp_path: Path, url: str) -> Image.Image:
    path = tmp_path / "page.png"
    _browser(chromium, tmp_path, f"--screenshot={path}", "--window-size=1200,1600", url)
    assert path.stat().st_size > 10_000
    return Image.open(path).convert("RGB")


@pytest.mark.slow
def test_the_run_list_links_every_run_with_its_status(chromium: str, dashboard: str, tmp_path: Path) -> None:
    dom = _browser(chromium, tmp_path, "--dump-dom", f"{dashboard}/")
    assert 'href="/runs/grown"' in dom
    assert "completed" in dom


@pytest.mark.slow
def test_a_run_page_draws_its_curves_and_lifecycles(
    chromium: str, dashboard: str, runs_dir: Path, tmp_path: Path
) -> None:
    dom = _browser(chromium, tmp_path, "--dump-dom", f"{dashboard}/runs/grown")
    assert run_info(runs_dir / "grown").run_id in dom
    for series in ("validation accuracy", "training loss", "validation loss", "parameters"):
        match = re.search(rf'<path class="series" data-series="{series}" d="([^"]+)"', dom)
        assert match is not None, series
        assert match.group(1).count("L") > 5  # a curve through many evaluations
    assert 'data-stage="FOSSILIZED' in dom or 'data-stage="GERMINATED' in dom or 'data-stage="TRAINING' in dom
    image = _screenshot(chromium, tmp_path, f"{dashboard}/runs/grown")
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 20  # not a blank page


@pytest.mark.slow
def test_the_comparison_page_plots_accuracy_against_parameters(
    chromium: str, dashboard: str, tmp_path: Path
) -> None:
    dom = _browser(chromium, tmp_path, "--dump-dom", f"{dashboard}/compare?run=grown")
    assert "accuracy against parameters" in dom
    assert re.search(r'<path class="series" data-series="run-[0-9a-f]+" d="M', dom)
    assert "growth timeline" in dom and 'class="marker"' in dom


@pytest.mark.slow
def test_an_unknown_run_is_a_404_page(chromium: str, dashboard: str, tmp_path: Path) -> None:
    dom = _browser(chromium, tmp_path, "--dump-dom", f"{dashboard}/runs/nope")
    assert "not found" in dom and "nope" in dom


def test_ticks_cover_the_data() -> None:
    ticks = nice_ticks(0.14, 0.93)
    assert ticks[0] <= 0.14 and ticks[-1] >= 0.93 and len(ticks) <= 7


@pytest.mark.slow
def test_a_running_runs_page_reloads_itself_and_a_finished_one_does_not(runs_dir: Path) -> None:
    assert 'http-equiv="refresh"' not in run_page(runs_dir, "grown")
    status = {"status": "running", "reason": None, "pid": os.getpid(), "started_at": "2026-01-01T00:00:00Z"}
    (runs_dir / "grown" / "status.json").write_text(json.dumps(status), encoding="utf-8")
    assert '<meta http-equiv="refresh" content="7">' in run_page(runs_dir, "grown", refresh_s=7)
