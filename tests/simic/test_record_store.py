"""Simic's record store: every record taken off the bus is durable before its ack, held once per command
id, and reloaded by a restarted learner (a real one killed with SIGKILL between its drain and its round)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from esper.leyline import pb
from esper.oona import EmbeddedBus, OonaSettings, Streams, envelope_for
from esper.simic.records import RecordStore, RecordStoreError
from esper.simic.settings import SimicSettings
from esper.simic.trainer import SimicState, SimicTrainer, serve
from esper.simic.transitions import RecordCollector, drain_bus
from tests.simic.support import heuristic_records
from tests.tamiyo.packets import SECRET, settings, small_policy

REPO = Path(__file__).resolve().parents[2]
RECORDS = heuristic_records(12)  # 12 decisions, each with its report


def publish(bus: EmbeddedBus, messages: list[pb.DecisionRecord | pb.FieldReport]) -> None:
    for message in messages:
        stream = Streams.DECISIONS if isinstance(message, pb.DecisionRecord) else Streams.FIELD_REPORTS
        bus.publish(stream, envelope_for(message))


def test_a_record_is_held_once_per_kind_and_command_id_and_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "records.sqlite3"
    decision, report = RECORDS[0], RECORDS[1]
    with RecordStore(path) as store:
        assert store.add([decision, report, decision]) == [decision, report]
        assert store.add([report]) == []
    with RecordStore(path) as store:
        assert store.load() == [decision, report]
        assert store.count("decision") == store.count("field_report") == 1
        assert store.command_ids("field_report") == [report.command_id]


def test_a_batch_with_a_record_without_command_id_is_refused_whole(tmp_path: Path) -> None:
    with RecordStore(tmp_path / "records.sqlite3") as store:
        with pytest.raises(ValueError, match="without a command id"):
            store.add([RECORDS[0], pb.FieldReport(report_id="r")])
        assert store.load() == []


def test_load_newest_keeps_the_latest_of_each_kind_in_arrival_order(tmp_path: Path) -> None:
    with RecordStore(tmp_path / "records.sqlite3") as store:
        store.add(RECORDS)
        newest = store.load(newest=2)
    assert newest == [RECORDS[-4], RECORDS[-2], RECORDS[-3], RECORDS[-1]]


def test_a_damaged_row_is_a_typed_error(tmp_path: Path) -> None:
    path = tmp_path / "records.sqlite3"
    with RecordStore(path) as store:
        store.add(RECORDS[:2])
    db = sqlite3.connect(path)
    db.execute("UPDATE records SET payload = x'ffffffff' WHERE kind = 'decision'")
    db.commit()
    db.close()
    with RecordStore(path) as store, pytest.raises(RecordStoreError, match="does not parse"):
        store.load()


@given(
    deliveries=st.lists(st.integers(min_value=0, max_value=len(RECORDS) - 1), min_size=1, max_size=40),
    crash_after=st.integers(min_value=0, max_value=40),
)
def test_redelivered_records_are_held_and_counted_once_across_a_restart(
    tmp_path_factory: pytest.TempPathFactory, deliveries: list[int], crash_after: int
) -> None:
    """Any sequence of (re)published records, drained by a learner that restarts half-way (its memory
    gone, its store kept), ends with each record held once and each report counted once."""
    root = tmp_path_factory.mktemp("drain")
    bus = EmbeddedBus(root / "bus.sqlite3", OonaSettings())
    store = RecordStore(root / "records.sqlite3")
    try:
        collector = RecordCollector()
        for index, position in enumerate(deliveries):
            publish(bus, [RECORDS[position]])
            if index == crash_after:
                drain_bus(bus, collector, group="simic", consumer="simic-0", store=store)
                store.close()  # the learner dies; a new one starts from its store
                store = RecordStore(root / "records.sqlite3")
                collector = RecordCollector()
                collector.extend(store.load())
                collector.reports_received = store.count("field_report")
        drain_bus(bus, collector, group="simic", consumer="simic-0", store=store)
        distinct = {RECORDS[p].command_id for p in deliveries if isinstance(RECORDS[p], pb.FieldReport)}
        decisions = {RECORDS[p].command_id for p in deliveries if isinstance(RECORDS[p], pb.DecisionRecord)}
        assert sorted(store.command_ids("field_report")) == sorted(distinct)
        assert sorted(store.command_ids("decision")) == sorted(decisions)
        assert collector.reports_received == collector.report_count == len(distinct)
    finally:
        store.close()
        bus.close()


def test_a_restarted_learner_trains_on_what_it_acked_before_it_stopped(tmp_path: Path) -> None:
    bus = EmbeddedBus(tmp_path / "bus.sqlite3", OonaSettings())
    state = SimicState(tmp_path / "simic")
    try:
        publish(bus, RECORDS)

        def learner(min_new: int) -> SimicTrainer:
            return SimicTrainer(
                SimicSettings(round_min_new_reports=min_new, poll_ms=1, min_transitions=4),
                settings(),
                small_policy(settings()),
                SECRET,
                state=state,
            )

        with RecordStore(state.records_path) as store:
            drained = iter([False, True])  # one pass over the bus, then stop: no round was due
            assert serve(bus, learner(100), should_stop=lambda: next(drained), store=store) == []
        with RecordStore(state.records_path) as store:
            results = serve(bus, learner(len(RECORDS) // 2), max_rounds=1, store=store)
        assert (
            results[0].transitions == len(RECORDS) // 2 and results[0].reports_received == len(RECORDS) // 2
        )
        assert state.rounds()[-1]["reports_received"] == len(RECORDS) // 2
    finally:
        bus.close()


def _learner_env(tmp_path: Path, min_new: int) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]),
        "ESPER_DATA_DIR": str(tmp_path / "data"),
        "ESPER_BUS_URL": "",
        "ESPER_SIGNING_SECRET": "record-store-secret-0123456789",
        "SIMIC_ROUND_MIN_NEW_REPORTS": str(min_new),
        "SIMIC_MIN_TRANSITIONS": "4",
        "SIMIC_POLL_MS": "20",
    }


def _held(path: Path, kind: str) -> int:
    if not path.exists():
        return 0
    db = sqlite3.connect(path, timeout=30)
    try:
        return int(db.execute("SELECT COUNT(*) FROM records WHERE kind = ?", (kind,)).fetchone()[0])
    except sqlite3.OperationalError:  # the table is not created yet
        return 0
    finally:
        db.close()


@pytest.mark.slow
def test_a_learner_killed_between_its_drain_and_its_round_loses_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    bus = EmbeddedBus(data / "bus.sqlite3", OonaSettings())
    try:
        publish(bus, RECORDS)
    finally:
        bus.close()
    command = [sys.executable, "-c", "from esper.cli import main; main()", "simic", "serve", "--json"]
    # A round needs more reports than there are: the learner drains, acks and waits.
    learner = subprocess.Popen(
        command, cwd=REPO, env=_learner_env(tmp_path, 1000), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        records = data / "simic" / "records.sqlite3"
        deadline = time.monotonic() + 120
        while _held(records, "field_report") < len(RECORDS) // 2:
            assert learner.poll() is None, learner.stderr.read().decode() if learner.stderr else ""
            assert time.monotonic() < deadline, "the learner never held the reports"
            time.sleep(0.05)
        learner.send_signal(signal.SIGKILL)
    finally:
        learner.kill()
        learner.wait()
    bus = EmbeddedBus(data / "bus.sqlite3", OonaSettings())
    try:  # acked: the bus will never deliver them to the learner's group again
        pending = {
            g.name: g.pending for s in bus.stats() for g in s.groups if s.stream == Streams.FIELD_REPORTS
        }
        assert pending == {"simic": 0}
    finally:
        bus.close()
    restarted = subprocess.run(
        [*command, "--max-rounds", "1"],
        cwd=REPO,
        env=_learner_env(tmp_path, len(RECORDS) // 2),
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert restarted.returncode == 0, restarted.stderr.decode()[-2000:]
    assert f"{len(RECORDS) // 2} field report(s) held" in restarted.stdout.decode()
    round_line = [line for line in restarted.stdout.decode().splitlines() if line.startswith("{")][-1]
    assert json.loads(round_line)["transitions"] == len(RECORDS) // 2


def test_records_delivered_but_never_acked_are_reclaimed_by_the_next_learner(tmp_path: Path) -> None:
    """A learner that died between a delivery and its durable write left the batch pending in its group:
    the bus never delivers it as new again, so the next learner takes it over."""
    bus = EmbeddedBus(tmp_path / "bus.sqlite3", OonaSettings())
    state = SimicState(tmp_path / "simic")
    try:
        publish(bus, RECORDS)
        for stream in (Streams.DECISIONS, Streams.FIELD_REPORTS):
            bus.ensure_group(stream, "simic", from_beginning=True)
            assert len(bus.consume(stream, "simic", "simic-0", count=4)) == 4  # delivered, never acked
        learner = SimicTrainer(
            SimicSettings(round_min_new_reports=100, poll_ms=1),
            settings(),
            small_policy(settings()),
            SECRET,
            state=state,
        )
        with RecordStore(state.records_path) as store:
            drained = iter([False, True])
            serve(bus, learner, should_stop=lambda: next(drained), store=store)
            assert store.count("decision") == store.count("field_report") == len(RECORDS) // 2
        pending = {(s.stream, g.name): g.pending for s in bus.stats() for g in s.groups}
        assert set(pending.values()) == {0}
    finally:
        bus.close()
