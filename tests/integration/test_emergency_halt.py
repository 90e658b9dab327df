"""Emergency halt across processes: a HALT broadcast on the embedded bus stops a trainer in another process
promptly; it checkpoints, logs the reason, exits with its halted status, and resumes later."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from esper.oona import EmergencyBroadcaster, open_bus
from tests.integration.run_worker import HALTED_EXIT, SECRET, bus_settings

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_halt_from_another_process_stops_the_trainer_with_a_checkpoint(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}  # this tree's code
    bus_dir, run_dir = tmp_path / "bus", tmp_path / "runs" / "run"
    worker = [sys.executable, "-m", "tests.integration.run_worker", str(run_dir)]
    process = subprocess.Popen([*worker, "--delay", "0.05", "--bus-dir", str(bus_dir)], cwd=REPO, env=env)
    try:
        # The listener exists before the first checkpoint is written: wait for that checkpoint.
        deadline = time.monotonic() + 60
        while not list(run_dir.glob("checkpoints/ckpt-*.json")):
            assert process.poll() is None, "the trainer ended before it could be halted"
            assert time.monotonic() < deadline, "the trainer never wrote its first checkpoint"
            time.sleep(0.02)
        esper, oona = bus_settings(bus_dir)
        bus = open_bus(esper, oona)
        try:
            signal = EmergencyBroadcaster(bus, "operator", secret=SECRET).halt(
                "operator stop: disk filling up"
            )
        finally:
            bus.close()
        returncode = process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert returncode == HALTED_EXIT

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "halted"
    assert summary["halt"]["reason"] == "operator stop: disk filling up"
    assert summary["halt"]["signal_id"] == signal.signal_id
    halted_at = summary["steps"]
    assert 0 < halted_at < 184  # obeyed before the end of training (seconds would make the test flaky)
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    (halt,) = [e for e in events if e["kind"] == "emergency_halt"]
    assert halt["step"] == halted_at and halt["detail"]["origin"] == "operator"
    latest = sorted((run_dir / "checkpoints").glob("ckpt-*.json"))[-1]
    assert json.loads(latest.read_text())["step"] == halted_at

    subprocess.run([*worker, "--resume"], cwd=REPO, env=env, check=True, timeout=120)
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert resumed["status"] == "completed" and resumed["resumed_from_step"] == halted_at
    assert resumed["steps"] == 184
