"""`esper serve --service simic --actors 2` as real processes, on the embedded bus and on Redis (slow).

Issue 21: actors crash and restart under `esper serve`, and no report is lost or double-counted. One actor
is killed with SIGKILL mid-episode (by the harness in actor_harness/, right after a decision at step 45,
past its first checkpoint) and the learner once (as soon as it holds a few reports); the supervisor
restarts both. When both actors have finished their episodes, serve is stopped with SIGTERM, and:

- every field report the actors' runs recorded and published (their Tamiyo stores are the source of
  truth) is in the learner's record store exactly once, and nothing else is;
- every episode is one training run (one run id, no duplicated step among its decisions), the killed one
  resumed from its checkpoint rather than run again;
- the restarts are in the health file and in what serve printed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from esper.leyline import pb
from esper.simic.records import RecordStore
from esper.tamiyo import TamiyoStore
from esper.weatherlight.health import HealthFileError, read_health

REPO = Path(__file__).resolve().parents[2]
HARNESS = Path(__file__).parent / "actor_harness"
EPISODES = 2  # per actor
KILL_AT_STEP = 45  # in epoch 2 of every family's first episode (20 to 38 steps an epoch, 3 epochs)


def wait_until(
    condition: Callable[[], Any], what: str, process: subprocess.Popen[bytes], timeout: float
) -> Any:
    """Poll `condition` until it holds; fails if serve exited or `timeout` passed (a hang, not a race)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if process.poll() is not None:
            raise AssertionError(f"esper serve exited ({process.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def services(health_path: Path) -> dict[str, dict[str, Any]]:
    try:
        document = read_health(health_path)
    except HealthFileError:
        return {}
    return {s["name"]: s for s in document["services"]}


def held_reports(path: Path) -> int:
    if not path.exists():
        return 0
    try:
        with RecordStore(path, busy_timeout_s=5.0) as store:
            return store.count("field_report")
    except Exception:  # noqa: BLE001 (the learner may be creating the file: try again on the next poll)
        return 0


def published(data: Path) -> tuple[dict[str, pb.FieldReport], dict[str, list[pb.DecisionRecord]], list[str]]:
    """From every actor's runs: the published field reports by command id, the published decisions by
    run id, and anything still pending (there should be none)."""
    reports: dict[str, pb.FieldReport] = {}
    decisions: dict[str, list[pb.DecisionRecord]] = {}
    pending: list[str] = []
    for database in sorted(data.glob("actors/*/runs/*/tamiyo.sqlite3")):
        with TamiyoStore(database, create=False) as store:
            for stored in store.field_reports():
                if stored.status == "published":
                    assert stored.report.command_id not in reports, "one command, two reports"
                    reports[stored.report.command_id] = stored.report
                elif stored.status == "pending":
                    pending.append(f"{database}: report {stored.report.report_id}")
            for entry in store.outbox_entries():
                if entry.kind != "decision":
                    continue
                if entry.status == "published":
                    decision = pb.DecisionRecord.FromString(entry.payload)
                    decisions.setdefault(decision.training_run_id, []).append(decision)
                elif entry.status == "pending":
                    pending.append(f"{database}: decision {entry.command_id}")
    return reports, decisions, pending


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["embedded", pytest.param("redis", marks=pytest.mark.redis)])
def test_actors_and_learner_killed_under_serve_lose_and_double_count_nothing(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    data = tmp_path / "data"
    url = request.getfixturevalue("private_redis").url if backend == "redis" else ""
    marker = tmp_path / "actor-0-killed"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HARNESS), str(REPO / "src"), str(REPO)]),
        "ESPER_DATA_DIR": str(data),
        "ESPER_BUS_URL": url,
        "ESPER_SIGNING_SECRET": "parallel-actors-secret-0123456789",
        "COLUMNS": "400",  # one line per event in serve's output
        "HARNESS_KILL_ACTOR": f"actor-0:{KILL_AT_STEP}",
        "HARNESS_KILL_MARKER": str(marker),
        "ACTOR_EPOCHS": "3",
        "ACTOR_DECISION_INTERVAL": "5",
        "ACTOR_MAX_EPISODES": str(EPISODES),
        "TOLARIA_CHECKPOINT_EVERY_EPOCHS": "1",
        "SIMIC_ROUND_MIN_NEW_REPORTS": "24",
        "SIMIC_UPDATE_EPOCHS": "1",
        "SIMIC_IMITATION_EPOCHS": "2",
        "SIMIC_POLL_MS": "50",
        "WEATHERLIGHT_RESTART_INITIAL_MS": "100",
        "WEATHERLIGHT_RESTART_MAX_MS": "500",
        "WEATHERLIGHT_POLL_INTERVAL_MS": "50",
        "WEATHERLIGHT_STOP_TIMEOUT_S": "60",
    }
    health_path = data / "weatherlight" / "health.json"
    records = data / "simic" / "records.sqlite3"
    log = tmp_path / "serve.log"  # serve's and its services' output (a pipe nobody reads could fill)
    serve = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from esper.cli import main; main()",
            "serve",
            "--service",
            "simic",
            "--actors",
            "2",
        ],
        cwd=REPO,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        # The learner is killed once it holds a few reports; the supervisor restarts it.
        wait_until(lambda: held_reports(records) >= 5, "the learner to hold reports", serve, 120)
        learner_pid = services(health_path)["simic"]["pid"]
        os.kill(learner_pid, signal.SIGKILL)
        wait_until(
            lambda: (
                services(health_path)["simic"]["restarts"] >= 1
                and services(health_path)["simic"]["state"] == "running"
            ),
            "the learner's restart",
            serve,
            60,
        )
        # actor-0 killed itself mid-episode (the harness); both actors finish their episodes and exit 0.
        wait_until(
            lambda: all(
                services(health_path)[name]["state"] == "stopped"
                and services(health_path)[name]["last_exit_code"] == 0
                for name in ("actor-0", "actor-1")
            ),
            "both actors to finish",
            serve,
            240,
        )
        truth, decisions, pending = published(data)
        assert not pending, pending
        wait_until(lambda: held_reports(records) >= len(truth), "the learner to hold every report", serve, 60)
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=120)
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
    text = log.read_text()
    assert serve.returncode == 0, text[-4000:]

    # The kill happened where it was armed, and was a crash the supervisor restarted.
    killed_run, killed_step = marker.read_text().split()
    assert int(killed_step) >= KILL_AT_STEP
    health = services(health_path)
    assert health["actor-0"]["restarts"] >= 1 and health["simic"]["restarts"] >= 1, health
    assert "actor-0 service_restart_scheduled: killed by SIGKILL" in text, text[-4000:]
    assert "simic service_restart_scheduled: killed by SIGKILL" in text, text[-4000:]

    # Every published report held by the learner exactly once; nothing else held.
    with RecordStore(records) as store:
        held = store.command_ids("field_report")
        held_decisions = [m for m in store.load() if isinstance(m, pb.DecisionRecord)]
        held_reports_by_id = {m.command_id: m for m in store.load() if isinstance(m, pb.FieldReport)}
    assert truth, "the actors published no field report"
    assert len(held) == len(set(held))
    assert sorted(held) == sorted(truth)
    assert all(held_reports_by_id[c].report_id == truth[c].report_id for c in truth)

    # Every episode is one whole run: one run id, each step decided once, the killed one resumed.
    run_ids: list[str] = []
    for actor in ("actor-0", "actor-1"):
        state = json.loads((data / "actors" / actor / "actor.json").read_text())
        assert state["completed"] == EPISODES and state["current"] is None, state
        runs = sorted((data / "actors" / actor / "runs").iterdir())
        assert len(runs) == EPISODES, runs  # no half-duplicate of the killed episode
        for run in runs:
            config = json.loads((run / "config.json").read_text())
            summary = json.loads((run / "summary.json").read_text())
            assert summary["status"] == "completed" and summary["run_id"] == config["training_run_id"]
            run_ids.append(config["training_run_id"])
            if config["training_run_id"] == killed_run:
                assert summary["resumed_from_step"] is not None
    assert len(set(run_ids)) == len(run_ids) == 2 * EPISODES
    assert killed_run in run_ids
    assert {d.training_run_id for d in held_decisions} <= set(run_ids)
    for run_id in run_ids:
        steps = [d.packet.global_step for d in held_decisions if d.training_run_id == run_id]
        assert steps and len(steps) == len(set(steps)), (run_id, sorted(steps))
        assert sorted(steps) == sorted(d.packet.global_step for d in decisions[run_id])
