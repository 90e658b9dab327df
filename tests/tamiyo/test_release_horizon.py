"""Records leave only once a durable checkpoint covers them: the release horizon of a run (issue 16, 6)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from esper.leyline import ManualClock, load_settings, pb
from esper.oona import EmbeddedBus, OonaSettings, Streams
from esper.tamiyo import HeuristicPolicy, TamiyoService
from esper.tamiyo.records.schema import MIGRATIONS
from esper.tamiyo.records.store import TamiyoStore
from esper.tamiyo.settings import TamiyoSettings
from tests.tamiyo.packets import make_packet
from tests.tamiyo.test_outbox import Events, consume, make_outbox
from tests.tamiyo.test_store import decision, insert_old_report, report, window

SECRET = b"release-horizon-secret-0123456789"


def _decided(store: TamiyoStore, command_id: str, step: int, run: str = "run-1") -> None:
    record = decision(command_id)
    record.training_run_id = run
    record.packet.training_run_id = run
    record.packet.global_step = step
    store.record_decision(record, window(command_id) if run == "run-1" else None)


def _closing(command_id: str) -> pb.FieldReport:
    closing = report(f"fr-{command_id}")
    closing.command_id = command_id
    return closing


def _due(store: TamiyoStore, *, hold: bool) -> set[tuple[str, str]]:
    return {(e.kind, e.command_id) for e in store.due_outbox(2**62, hold=hold)}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TamiyoStore]:
    with TamiyoStore(tmp_path / "tamiyo.sqlite3") as opened:
        yield opened


def test_a_held_run_publishes_nothing_until_a_checkpoint_covers_it(store: TamiyoStore) -> None:
    _decided(store, "cmd-a", 10)
    _decided(store, "cmd-b", 30)
    store.close_window("cmd-a", _closing("cmd-a"), as_of_step=30)

    assert _due(store, hold=True) == set()
    assert store.next_outbox_due_ns(hold=True) is None  # nothing to wake the publisher for
    store.release_through("run-1", 20)
    assert _due(store, hold=True) == {("decision", "cmd-a")}
    store.release_through("run-1", 30)
    assert _due(store, hold=True) == {
        ("decision", "cmd-a"),
        ("decision", "cmd-b"),
        ("field_report", "cmd-a"),
    }


def test_without_holding_a_run_with_no_horizon_publishes_at_once_and_a_horizon_still_binds(
    store: TamiyoStore,
) -> None:
    _decided(store, "cmd-a", 10)
    _decided(store, "cmd-x", 99, run="run-2")
    assert _due(store, hold=False) == {("decision", "cmd-a"), ("decision", "cmd-x")}

    store.release_through("run-1", 5)  # a trainer drives run-1: its horizon applies, held or not
    assert _due(store, hold=False) == {("decision", "cmd-x")}
    assert store.next_outbox_due_ns(hold=False) is not None


def test_the_horizon_only_moves_forward_and_a_resume_sets_it_to_the_restored_step(store: TamiyoStore) -> None:
    store.release_through("run-1", 40)
    store.release_through("run-1", 20)  # a late, older checkpoint never takes a release back
    assert store.release_horizon("run-1") == 40
    with pytest.raises(ValueError, match="step"):
        store.release_through("run-1", -1)

    # The newest checkpoint (40) turned out damaged: the run resumes from 23. What it decides again after
    # 23 waits for its next checkpoint, also below the old horizon.
    store.abandon_after("run-1", 23)
    assert store.release_horizon("run-1") == 23
    _decided(store, "cmd-again", 30)
    assert _due(store, hold=True) == set()


def test_a_resume_abandons_what_was_held_so_nothing_was_published(store: TamiyoStore) -> None:
    _decided(store, "cmd-a", 20)
    store.release_through("run-1", 20)  # the checkpoint at 20 is durable
    _decided(store, "cmd-b", 25)  # then the process dies
    store.mark_published(store.due_outbox(2**62, hold=True))

    cut = store.abandon_after("run-1", 20)

    assert (cut.decisions, cut.already_published) == (1, 0)
    assert store.outbox_counts("decision") == {"pending": 0, "published": 1, "dropped": 1}


def test_release_all_releases_every_run_to_its_newest_record(store: TamiyoStore) -> None:
    _decided(store, "cmd-a", 10)
    store.close_window("cmd-a", _closing("cmd-a"), as_of_step=50)
    _decided(store, "cmd-x", 7, run="run-2")
    store.release_all()
    assert (store.release_horizon("run-1"), store.release_horizon("run-2")) == (50, 7)
    assert len(store.due_outbox(2**62, hold=True)) == 3


def test_records_written_before_the_migration_are_never_held(tmp_path: Path) -> None:
    path = tmp_path / "tamiyo.sqlite3"
    TamiyoStore(path, migrations=MIGRATIONS[:2]).close()
    insert_old_report(path, report("fr-old"))
    with TamiyoStore(path) as store:
        assert store.schema_version() == MIGRATIONS[-1].version
        assert _due(store, hold=True) == {("field_report", "cmd-fr-old")}
    db = sqlite3.connect(path)
    assert db.execute("SELECT as_of_step FROM field_reports").fetchall() == [(None,)]
    db.close()


def test_the_outbox_publishes_a_decision_once_a_checkpoint_covers_it(tmp_path: Path) -> None:
    clock = ManualClock()
    events: Events = []
    with TamiyoStore(tmp_path / "tamiyo.sqlite3", clock=clock) as store:
        bus = EmbeddedBus(tmp_path / "bus.sqlite3", load_settings(OonaSettings, environ={}))
        try:
            outbox, _ = make_outbox(store, bus, clock, events)
            outbox.hold = True
            _decided(store, "cmd-a", 10)
            store.release_through("run-1", 5)  # the last durable checkpoint is before the decision

            assert outbox.pump().published == 0
            assert outbox.seconds_until_due() is None
            assert consume(bus, Streams.DECISIONS) == []

            store.release_through("run-1", 10)
            assert outbox.pump().published == 1
            assert [e.attributes["command_id"] for e in consume(bus, Streams.DECISIONS)] == ["cmd-a"]
        finally:
            bus.close()


def _service(tmp_path: Path, *, hold: bool) -> tuple[TamiyoService, TamiyoStore, EmbeddedBus]:
    settings = load_settings(TamiyoSettings, environ={}, fr_obs_window_epochs=1)
    store = TamiyoStore(tmp_path / "tamiyo.sqlite3")
    bus = EmbeddedBus(tmp_path / "bus.sqlite3", load_settings(OonaSettings, environ={}))
    service = TamiyoService(
        settings, HeuristicPolicy(settings), SECRET, store=store, bus=bus, hold_until_checkpoint=hold
    )
    return service, store, bus


def _published(bus: EmbeddedBus) -> dict[str, list[str]]:
    return {
        stream: [e.attributes["command_id"] for e in consume(bus, stream)]
        for stream in (Streams.DECISIONS, Streams.FIELD_REPORTS)
    }


def _packet(step: int, epoch: int) -> pb.SystemStatePacket:
    packet = make_packet()
    packet.packet_id = f"pkt-{step}"
    packet.current_epoch = epoch
    packet.global_step = step
    return packet


@pytest.mark.parametrize("checkpointed", [False, True])
def test_a_holding_service_publishes_on_a_stopped_run_only_what_a_checkpoint_covers(
    tmp_path: Path, checkpointed: bool
) -> None:
    service, store, bus = _service(tmp_path, hold=True)
    try:
        first = service.evaluate_step(_packet(10, 1))
        second = service.evaluate_step(_packet(20, 2))  # closes the first decision's window
        if checkpointed:
            service.checkpointed("run-1", 10)
        service.close(abort_open_windows=False)  # the run stopped early: its last pass publishes
        published = _published(bus)
    finally:
        store.close()
        bus.close()
    if checkpointed:
        assert published == {Streams.DECISIONS: [first.command_id], Streams.FIELD_REPORTS: []}
    else:
        assert published == {Streams.DECISIONS: [], Streams.FIELD_REPORTS: []}
    assert second.command_id not in published[Streams.DECISIONS]


def test_a_rollback_abandons_what_was_decided_after_the_checkpoint_it_went_back_to(tmp_path: Path) -> None:
    service, store, bus = _service(tmp_path, hold=True)
    try:
        kept = service.evaluate_step(_packet(10, 1))
        service.checkpointed("run-1", 10)
        undone = service.evaluate_step(_packet(20, 2))  # then the loss explodes: back to step 10
        service.rewound("run-1", 10)
        service.checkpointed("run-1", 30)  # the next checkpoint of the new timeline
        service.close(abort_open_windows=False)
        published = _published(bus)
        assert store.outbox_counts("decision")["dropped"] == 1
    finally:
        store.close()
        bus.close()
    assert undone.command_id not in published[Streams.DECISIONS]
    assert kept.command_id in published[Streams.DECISIONS]


def test_a_completed_run_publishes_everything_when_its_service_closes(tmp_path: Path) -> None:
    service, store, bus = _service(tmp_path, hold=True)
    try:
        commands = [service.evaluate_step(_packet(10 * i, i)) for i in (1, 2, 3)]
        service.close(abort_open_windows=True)  # no checkpoint ever said so: the run's end releases all
        published = _published(bus)
        assert store.outbox_counts("decision")["pending"] == 0
        assert store.outbox_counts("field_report")["pending"] == 0
    finally:
        store.close()
        bus.close()
    ids = [c.command_id for c in commands]
    assert published[Streams.DECISIONS] == ids
    assert sorted(published[Streams.FIELD_REPORTS]) == sorted(ids)  # two closed, the last ABORTED


def test_a_service_that_does_not_hold_publishes_at_once(tmp_path: Path) -> None:
    service, store, bus = _service(tmp_path, hold=False)
    try:
        command = service.evaluate_step(_packet(10, 1))
        service.close(abort_open_windows=False)
        published = _published(bus)
    finally:
        store.close()
        bus.close()
    assert published[Streams.DECISIONS] == [command.command_id]
