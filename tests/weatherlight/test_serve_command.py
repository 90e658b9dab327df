"""`esper serve`: --status shows the health file (and says when it is stale); bad settings are named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from esper.cli import app
from esper.weatherlight.health import ServiceHealth, ServiceState, write_health

runner = CliRunner()


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ESPER_DATA_DIR", str(tmp_path))
    return tmp_path


def write(data_dir: Path, supervisor_pid: int, state: str = "running") -> None:
    write_health(
        data_dir / "weatherlight" / "health.json",
        supervisor_pid=supervisor_pid,
        supervisor_state=state,
        updated_at="2026-01-01T00:00:00.000+00:00",
        services=[
            ServiceHealth(
                name="simic",
                state=ServiceState.RESTARTING,
                pid=None,
                restarts=2,
                last_exit_code=-9,
                last_change="2026-01-01T00:00:00.000+00:00",
                reason="killed by SIGKILL; restart 3 of 5 within 300 s in 2.00 s",
                next_start_at="2026-01-01T00:00:02.000+00:00",
            )
        ],
    )


def test_status_prints_every_service(data_dir: Path) -> None:
    write(data_dir, os.getpid())
    result = runner.invoke(app, ["serve", "--status"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert f"weatherlight pid {os.getpid()}: running" in result.stdout
    assert "simic" in result.stdout and "restarting" in result.stdout
    assert "killed by" in result.stdout and "-9" in result.stdout
    assert "—" in result.stdout  # no pid while restarting: shown as missing


def test_status_says_when_the_supervisor_is_gone(data_dir: Path) -> None:
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], check=True, capture_output=True, text=True
    )
    write(data_dir, int(gone.stdout))
    result = runner.invoke(app, ["serve", "--status"], terminal_width=200)
    assert result.exit_code == 0
    assert "stale" in result.stdout


def test_status_as_json_is_the_health_file(data_dir: Path) -> None:
    write(data_dir, os.getpid())
    result = runner.invoke(app, ["serve", "--status", "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["services"][0]["restarts"] == 2


def test_status_without_a_health_file_fails(data_dir: Path) -> None:
    result = runner.invoke(app, ["serve", "--status"])
    assert result.exit_code == 1
    assert "does not exist" in result.output


def test_an_unknown_service_is_a_configuration_error_naming_the_setting(data_dir: Path) -> None:
    result = runner.invoke(app, ["serve", "--service", "tamiyo-dashboard"])
    assert result.exit_code == 2
    assert "WEATHERLIGHT_SERVICES" in result.output and "tamiyo-dashboard" in result.output
