"""`esper run` killed with SIGKILL and resumed: the bus never carries what the resume decided again (slow).

Issue 16, item 6: the outbox publishes within milliseconds, so without a release horizon the decisions and
reports made after the last checkpoint were on the bus before the kill, and Simic learnt from steps that
never happened.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from esper.leyline import EsperSettings, load_settings, pb
from esper.oona import OonaSettings, Streams, open_bus, open_envelope
from esper.tamiyo.records.store import TamiyoStore

REPO = Path(__file__).resolve().parents[2]
# digits on the MLP: 23 steps an epoch, checkpoints at 0, 23, 46, 69, 92; decisions every 5 steps. The
# kill lands after the decision at 60: those at 50, 55 and 60 lie past the checkpoint at 46, and the
# windows of epoch 1's decisions closed at 50, also past it. (Should the checkpoint at 46 still be in
# flight at the kill, the run resumes from 23, and more lies past it.)
RUN = ["run", "--epochs", "4", "--decision-interval", "5", "--no-progress", "--no-report"]
KILL_AT, INTERVAL = 60, 5


def _esper(
    env: dict[str, str], run_dir: Path, *extra: str, kill_at: int | None = None
) -> subprocess.CompletedProcess[bytes]:
    armed = [] if kill_at is None else ["--kill-at-step", str(kill_at)]
    command = [sys.executable, "-m", "tests.integration.killed_run", *armed, *RUN, "--run-dir", str(run_dir)]
    return subprocess.run(
        [*command, *extra], cwd=REPO, env=env, capture_output=True, timeout=300, check=False
    )


def _published(data_dir: Path) -> dict[str, list[pb.FieldReport | pb.DecisionRecord]]:
    esper = load_settings(EsperSettings, environ={}, data_dir=data_dir, bus_url="")
    bus = open_bus(esper, load_settings(OonaSettings, environ={}))
    try:
        found: dict[str, list[pb.FieldReport | pb.DecisionRecord]] = {}
        for stream, kind in ((Streams.DECISIONS, pb.DecisionRecord), (Streams.FIELD_REPORTS, pb.FieldReport)):
            bus.ensure_group(stream, "test", from_beginning=True)
            deliveries = bus.consume(stream, "test", "reader", count=1000)
            found[stream] = [open_envelope(d.envelope, kind) for d in deliveries]
        return found
    finally:
        bus.close()


@pytest.mark.slow
def test_a_killed_and_resumed_run_publishes_nothing_of_the_abandoned_steps(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]),
        "ESPER_DATA_DIR": str(tmp_path / "data"),
        "ESPER_SIGNING_SECRET": "resume-timeline-secret-0123456789",
        # a checkpoint every epoch (by default only by the clock and after structural changes), so that the
        # kill lands with decisions past the last one
        "TOLARIA_CHECKPOINT_EVERY_EPOCHS": "1",
    }
    run_dir = tmp_path / "run"
    killed = _esper(env, run_dir, kill_at=KILL_AT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    killed_at_ns = time.time_ns()

    resumed = _esper(env, run_dir, "--resume")
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    restored = json.loads((run_dir / "summary.json").read_text())["resumed_from_step"]
    assert restored in (23, 46)
    assert "published before the crash" not in resumed.stderr.decode()  # already_published == 0

    live = [
        json.loads(line)["command_id"]
        for line in (run_dir / "decisions.jsonl").read_text().splitlines()
        if "command_id" in json.loads(line)
    ]
    with TamiyoStore(run_dir / "tamiyo.sqlite3", create=False) as store:
        abandoned = {
            e.command_id
            for e in store.outbox_entries("dropped")
            if e.kind == "decision" and e.last_error.startswith("abandoned")
        }
        dropped_reports = [
            e.ref_id
            for e in store.outbox_entries("dropped")
            if e.kind == "field_report" and e.last_error.startswith("abandoned")
        ]
        assert (
            store.outbox_counts("decision")["pending"] == store.outbox_counts("field_report")["pending"] == 0
        )
    past = [step for step in range(INTERVAL, KILL_AT + 1, INTERVAL) if step > restored]
    assert len(abandoned) == len(past), abandoned  # at 46: the decisions at 50, 55 and 60
    assert dropped_reports, "no window of a kept decision closed past the checkpoint"

    published = _published(tmp_path / "data")
    decisions = [d for d in published[Streams.DECISIONS] if isinstance(d, pb.DecisionRecord)]
    reports = [r for r in published[Streams.FIELD_REPORTS] if isinstance(r, pb.FieldReport)]
    # One timeline on the bus: each live decision once, nothing abandoned, each step decided once.
    assert sorted(d.command_id for d in decisions) == sorted(live)
    assert not abandoned & {d.command_id for d in decisions}
    steps = [d.packet.global_step for d in decisions]
    assert len(steps) == len(set(steps))
    # Each live decision has one report, and none measured on the abandoned steps.
    assert sorted(r.command_id for r in reports) == sorted(live)
    assert not set(dropped_reports) & {r.report_id for r in reports}
    before_kill = [d for d in decisions if d.issued_at.ToNanoseconds() < killed_at_ns]
    assert before_kill and all(d.packet.global_step <= restored for d in before_kill)
