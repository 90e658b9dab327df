"""Damage to the store is detected, never silent: record checksums (main-file damage) and the
acknowledged-write mark (WAL damage)."""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Mapping
from pathlib import Path

import pytest
from typer.testing import CliRunner

from esper.cli import app
from esper.tamiyo.records.errors import StoreRecordsLost
from esper.tamiyo.records.schema import MIGRATIONS, SCHEMA_VERSION
from esper.tamiyo.records.store import TamiyoStore
from tests.tamiyo.test_store import decision, insert_old_report, report, window

PAGE = 4096
FRAME = 24 + PAGE


class Events:
    """An event sink that keeps (name, attributes)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str]]] = []

    def __call__(self, name: str, _description: str, attributes: Mapping[str, str]) -> None:
        self.seen.append((name, dict(attributes)))

    def names(self) -> list[str]:
        return [name for name, _ in self.seen]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "tamiyo.sqlite3"


def _raw(path: Path, statement: str, params: tuple[object, ...]) -> None:
    """Change the file behind the store's back (the store is closed)."""
    db = sqlite3.connect(path)
    db.execute(statement, params)
    db.commit()
    db.close()


def _flipped(blob: bytes, index: int = 5) -> bytes:
    data = bytearray(blob)
    data[index] ^= 0x01
    return bytes(data)


# -- item 12: record checksums ------------------------------------------------------------------------


def test_report_changed_in_the_file_is_dropped_with_an_event_and_the_rest_stay_readable(path: Path) -> None:
    with TamiyoStore(path) as store:
        store.add_field_reports([report("fr-1"), report("fr-2"), report("fr-3")])
    db = sqlite3.connect(path)
    blob = db.execute("SELECT report FROM field_reports WHERE report_id = 'fr-2'").fetchone()[0]
    db.close()
    _raw(path, "UPDATE field_reports SET report = ? WHERE report_id = 'fr-2'", (_flipped(blob),))
    events = Events()
    with TamiyoStore(path, events=events) as store:
        assert [s.report.report_id for s in store.field_reports()] == ["fr-1", "fr-3"]
        assert store.field_report("fr-2") is None
        assert {e.ref_id for e in store.outbox_entries()} == {"fr-1", "fr-3"}
        assert {e.ref_id for e in store.due_outbox(2**62)} == {"fr-1", "fr-3"}
    assert events.seen == [
        ("tamiyo_store_record_corrupt", {"path": str(path), "kind": "field report", "key": "fr-2"})
    ], "one event per damaged record, however often it is read"


def test_key_column_changed_in_the_file_is_caught_too(path: Path) -> None:
    with TamiyoStore(path) as store:
        store.add_field_reports([report("fr-1"), report("fr-2")])
    _raw(path, "UPDATE field_reports SET outcome = 3 WHERE report_id = 'fr-1'", ())
    events = Events()
    with TamiyoStore(path, events=events) as store:
        assert [s.report.report_id for s in store.field_reports()] == ["fr-2"]
    assert events.names() == ["tamiyo_store_record_corrupt"]


def test_bit_flip_in_the_main_file_is_caught_on_read(path: Path) -> None:
    marker = "flip-me-" * 8
    with TamiyoStore(path) as store:
        reports = [report(f"fr-{index}") for index in range(20)]
        reports[7].notes = marker
        store.add_field_reports(reports)
    data = bytearray(path.read_bytes())  # closed: the WAL is checkpointed into the main file
    offset = data.find(marker.encode())
    assert offset > 0 and data.find(marker.encode(), offset + 1) == -1
    data[offset + 3] ^= 0x04
    path.write_bytes(bytes(data))
    events = Events()
    with TamiyoStore(path, events=events) as store:
        assert store.integrity_check() == ["ok"], "SQLite keeps no content checksums: it sees nothing"
        read = [s.report.report_id for s in store.field_reports()]
    assert read == sorted(r.report_id for r in reports if r.report_id != "fr-7")
    assert events.seen == [
        ("tamiyo_store_record_corrupt", {"path": str(path), "kind": "field report", "key": "fr-7"})
    ]


def test_damaged_decision_and_window_are_dropped_with_events(path: Path) -> None:
    with TamiyoStore(path) as store:
        store.record_decision(decision("cmd-a"), window("cmd-a"))
        store.record_decision(decision("cmd-b"), window("cmd-b"))
    db = sqlite3.connect(path)
    blob = db.execute("SELECT record FROM decisions WHERE command_id = 'cmd-a'").fetchone()[0]
    db.close()
    _raw(path, "UPDATE decisions SET record = ? WHERE command_id = 'cmd-a'", (_flipped(blob),))
    _raw(path, "UPDATE windows SET baseline_accuracy = 0.75 WHERE command_id = 'cmd-b'", ())
    events = Events()
    with TamiyoStore(path, events=events) as store:
        assert store.decision("cmd-a") is None
        assert store.decision("cmd-b") is not None
        assert [e.command_id for e in store.due_outbox(2**62)] == ["cmd-b"]
        assert [w.command_id for w in store.open_windows()] == ["cmd-a"]
        assert [w.command_id for w in store.due_windows("run-1", 3)] == ["cmd-a"]
    assert sorted((a["kind"], a["key"]) for _, a in events.seen) == [
        ("decision", "cmd-a"),
        ("window", "cmd-b"),
    ]


def test_esper_reports_lists_the_intact_reports_beside_a_damaged_one(tmp_path: Path) -> None:
    path = tmp_path / "tamiyo.sqlite3"
    with TamiyoStore(path) as store:
        store.add_field_reports([report("fr-1"), report("fr-2")])
    _raw(path, "UPDATE field_reports SET report_id = 'fr-9' WHERE report_id = 'fr-1'", ())
    listed = CliRunner().invoke(app, ["reports", str(tmp_path), "--json"])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout.strip().splitlines()[-1])["field_reports"]
    assert [row["report_id"] for row in rows] == ["fr-2"]


def test_migration_computes_checksums_for_existing_records(path: Path) -> None:
    TamiyoStore(path, migrations=MIGRATIONS[:2]).close()
    insert_old_report(path, report("fr-old"))
    record, opened = decision("cmd-old"), window("cmd-old")
    _raw(
        path,
        "INSERT INTO decisions (command_id, decision_id, training_run_id, issued_at_ns, record,"
        " next_attempt_ns, updated_at_ns) VALUES (?, ?, ?, ?, ?, 0, 0)",
        (
            record.command_id,
            record.decision_id,
            record.training_run_id,
            record.issued_at.ToNanoseconds(),
            record.SerializeToString(),
        ),
    )
    _raw(
        path,
        "INSERT INTO windows VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        tuple(getattr(opened, field) for field in opened.__dataclass_fields__),
    )
    events = Events()
    with TamiyoStore(path, events=events) as store:
        assert store.schema_version() == SCHEMA_VERSION
        assert [s.report.report_id for s in store.field_reports()] == ["fr-old"]
        assert store.decision("cmd-old") is not None
        assert [w.command_id for w in store.open_windows()] == ["cmd-old"]
        assert len(store.outbox_entries()) == 2
    assert events.seen == []
    _raw(path, "UPDATE field_reports SET training_run_id = 'run-x'", ())
    with TamiyoStore(path, events=events) as store:
        assert store.field_reports() == []
    assert events.names() == ["tamiyo_store_record_corrupt"]


def test_the_unused_registry_table_is_gone(path: Path) -> None:
    with TamiyoStore(path, migrations=MIGRATIONS[:2]):
        pass
    TamiyoStore(path).close()
    db = sqlite3.connect(path)
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    db.close()
    assert "registries" not in tables and "field_reports" in tables


# -- item 11: WAL damage ------------------------------------------------------------------------------

WRITES = 30


def _crashed_copy(path: Path, target: Path) -> int:
    """Write `WRITES` acknowledged reports, then copy the files as a crash would leave them (no close()).

    Returns the WAL's size. The store is created and closed first, so the WAL holds only the reports.
    """
    TamiyoStore(path).close()
    store = TamiyoStore(path)
    try:
        for index in range(WRITES):
            store.add_field_report(report(f"fr-{index:03d}"))
        target.mkdir()
        for suffix in ("", "-wal", "-mark"):
            shutil.copyfile(f"{path}{suffix}", f"{target / path.name}{suffix}")
    finally:
        store.close()
    return (target / f"{path.name}-wal").stat().st_size


def _flip_wal(db: Path, offset: int) -> None:
    wal = Path(f"{db}-wal")
    data = bytearray(wal.read_bytes())
    data[offset] ^= 0x10
    wal.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "where",
    ["first frame's page", "a middle frame's page", "a middle frame's salt", "last frame's page"],
)
def test_wal_damage_after_acknowledged_writes_is_detected_at_open(tmp_path: Path, where: str) -> None:
    path = tmp_path / "live" / "tamiyo.sqlite3"
    copy = tmp_path / "crashed" / "tamiyo.sqlite3"
    size = _crashed_copy(path, copy.parent)
    frames = (size - 32) // FRAME
    assert frames >= WRITES
    offset = {
        "first frame's page": 32 + 24 + 100,
        "a middle frame's page": 32 + (frames // 2) * FRAME + 24 + 2000,
        "a middle frame's salt": 32 + (frames // 2) * FRAME + 9,
        "last frame's page": size - 100,
    }[where]
    _flip_wal(copy, offset)
    with pytest.raises(StoreRecordsLost) as info:
        TamiyoStore(copy)
    lost = info.value.lost
    assert lost >= 1
    with pytest.raises(StoreRecordsLost):  # refused again: nothing was written meanwhile
        TamiyoStore(copy)
    events = Events()
    with TamiyoStore(copy, events=events, accept_loss=True) as store:
        kept = store.count_field_reports()
    assert kept == WRITES - lost, "the count names exactly the acknowledged writes that are gone"
    assert events.seen == [("tamiyo_store_records_lost", {"path": str(copy), "lost": str(lost)})]
    with TamiyoStore(copy, events=events) as store:  # accepted once: the store carries on from there
        store.add_field_report(report("fr-after"))
        assert store.count_field_reports() == kept + 1
    assert len(events.seen) == 1


def test_wal_header_damage_is_detected_at_open(tmp_path: Path) -> None:
    path = tmp_path / "live" / "tamiyo.sqlite3"
    copy = tmp_path / "crashed" / "tamiyo.sqlite3"
    _crashed_copy(path, copy.parent)
    _flip_wal(copy, 17)  # salt-1: SQLite would ignore the whole WAL
    with pytest.raises(StoreRecordsLost):
        TamiyoStore(copy)


def test_an_intact_wal_left_by_a_crash_is_no_alarm(tmp_path: Path) -> None:
    path = tmp_path / "live" / "tamiyo.sqlite3"
    copy = tmp_path / "crashed" / "tamiyo.sqlite3"
    _crashed_copy(path, copy.parent)
    events = Events()
    with TamiyoStore(copy, events=events) as store:
        assert store.count_field_reports() == WRITES
    assert events.seen == []


def test_a_mark_from_an_older_wal_or_none_is_no_alarm(tmp_path: Path) -> None:
    path = tmp_path / "live" / "tamiyo.sqlite3"
    copy = tmp_path / "crashed" / "tamiyo.sqlite3"
    _crashed_copy(path, copy.parent)
    Path(f"{copy}-mark").unlink()  # a mark lost (say, to a power cut): nothing to compare with
    _flip_wal(copy, 32 + 24 + 100)
    with TamiyoStore(copy) as store:
        assert store.count_field_reports() == 0
    with TamiyoStore(path) as store:  # the live store was closed: its WAL is checkpointed and empty
        assert store.count_field_reports() == WRITES


def test_a_damaged_record_is_an_event_of_the_service_that_owns_the_store(path: Path) -> None:
    from esper.leyline import pb
    from esper.tamiyo.model.proposal import Proposal
    from esper.tamiyo.runtime.service import TamiyoService
    from tests.tamiyo.packets import SECRET, ScriptedPolicy, settings

    with TamiyoStore(path) as store:
        store.add_field_reports([report("fr-1"), report("fr-2")])
    _raw(path, "UPDATE field_reports SET outcome = 3 WHERE report_id = 'fr-1'", ())
    wait = Proposal(action=pb.POLICY_ACTION_WAIT, log_prob=-0.25, value=0.5, head_choices={"action": 0})
    with TamiyoStore(path) as store:
        service = TamiyoService(settings(), ScriptedPolicy(wait), SECRET, store=store)
        try:
            assert [s.report.report_id for s in store.field_reports()] == ["fr-2"]
            packet = service.telemetry.flush()
            assert "tamiyo_store_record_corrupt" in [event.name for event in packet.events]
        finally:
            service.close()
