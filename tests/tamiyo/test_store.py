"""TamiyoStore: one SQLite file for all of Tamiyo's durable state, typed errors, migrations, retention."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch

from esper.leyline import CONTRACT_VERSION, ContractVersionMismatch, ManualClock, pb
from esper.tamiyo.model.normalizer import FeatureNormalizer
from esper.tamiyo.model.normalizer_state import NormalizerState
from esper.tamiyo.model.schema import TAMIYO_SCHEMA
from esper.tamiyo.records.errors import (
    RecordRejected,
    StoreClosed,
    StoreCorrupted,
    StoreSchemaError,
    StoreWriteError,
    WindowNotOpen,
)
from esper.tamiyo.records.schema import MIGRATIONS, SCHEMA_VERSION, ObservationWindow
from esper.tamiyo.records.store import TamiyoStore

DAY_NS = 86_400 * 1_000_000_000


def report(
    report_id: str = "fr-synth-1", *, issued_ns: int | None = 1_700_000_000_000_000_000
) -> pb.FieldReport:
    """A valid field report (issued at `issued_ns`, or without `issued_at` when None)."""
    message = pb.FieldReport(
        report_id=report_id,
        command_id=f"cmd-{report_id}",
        training_run_id="run-1",
        outcome=pb.FIELD_REPORT_OUTCOME_SUCCESS,
        observation_window_epochs=1,
        tamiyo_policy_version="v1",
    )
    message.metrics["accuracy_delta"] = 0.01
    if issued_ns is not None:
        message.issued_at.FromNanoseconds(issued_ns)
    return message


def decision(command_id: str, issued_ns: int = 1_700_000_000_000_000_000) -> pb.DecisionRecord:
    record = pb.DecisionRecord(
        decision_id=f"dec-{command_id}",
        command_id=command_id,
        training_run_id="run-1",
        action=pb.POLICY_ACTION_WAIT,
        log_prob=-0.5,
        value_estimate=0.25,
        policy_version="v1",
    )
    record.issued_at.FromNanoseconds(issued_ns)
    record.head_choices["action"] = 0
    return record


def insert_old_report(path: Path, message: pb.FieldReport) -> None:
    """A report written as an Esper before checksums (schema 1 or 2) wrote it."""
    db = sqlite3.connect(path)
    db.execute(
        "INSERT INTO field_reports (report_id, command_id, training_run_id, outcome, issued_at_ns, report,"
        " next_attempt_ns, updated_at_ns) VALUES (?, ?, ?, ?, ?, ?, 0, 0)",
        (
            message.report_id,
            message.command_id,
            message.training_run_id,
            message.outcome,
            message.issued_at.ToNanoseconds(),
            message.SerializeToString(),
        ),
    )
    db.commit()
    db.close()


def window(command_id: str, start_epoch: int = 2, epochs: int = 1) -> ObservationWindow:
    return ObservationWindow(
        command_id=command_id,
        training_run_id="run-1",
        start_epoch=start_epoch,
        window_epochs=epochs,
        opened_at_ns=1,
        policy_version="v1",
        action=pb.POLICY_ACTION_WAIT,
        command_type=pb.COMMAND_WAIT,
        slot_id="",
        seed_id="",
        blueprint_id="",
        baseline_accuracy=0.5,
        baseline_loss=1.0,
        baseline_params=None,
    )


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "tamiyo.sqlite3"


def test_store_runs_in_wal_mode_with_full_sync(path: Path) -> None:
    with TamiyoStore(path) as store:
        assert store._db is not None
        assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert store.schema_version() == SCHEMA_VERSION
        assert [version for version, _ in store.migrations_applied()] == [m.version for m in MIGRATIONS]
    assert not list(path.parent.glob("*.json")), "no sidecar files"


def test_field_report_round_trip_with_outbox_entry(path: Path) -> None:
    with TamiyoStore(path) as store:
        store.add_field_report(report())
        stored = store.field_report("fr-synth-1")
        assert stored is not None and stored.report == report() and stored.status == "pending"
        assert store.outbox_counts() == {"pending": 1, "published": 0, "dropped": 0}


def test_report_without_issued_at_is_rejected(path: Path) -> None:
    with TamiyoStore(path) as store:
        with pytest.raises(RecordRejected) as info:
            store.add_field_report(report(issued_ns=None))
        assert info.value.field == "issued_at"
        assert store.count_field_reports() == 0


def test_duplicate_report_id_is_rejected_and_nothing_is_half_written(path: Path) -> None:
    with TamiyoStore(path) as store:
        store.add_field_report(report())
        with pytest.raises(RecordRejected, match="already stored"):
            store.add_field_report(report())
        assert store.count_field_reports() == 1
        assert len(store.outbox_entries()) == 1


def test_decision_window_and_close_are_atomic_and_survive_reopen(path: Path) -> None:
    with TamiyoStore(path) as store:
        store.record_decision(decision("cmd-a"), window("cmd-a"))
    with TamiyoStore(path) as store:
        assert [w.command_id for w in store.open_windows()] == ["cmd-a"]
        assert store.due_windows("run-1", 2) == []
        assert [w.command_id for w in store.due_windows("run-1", 3)] == ["cmd-a"]
        assert store.due_windows("run-2", 3) == []
        restored = store.decision("cmd-a")
        assert restored is not None and restored.log_prob == -0.5 and restored.head_choices["action"] == 0
        closing = report("fr-synth-a")
        closing.command_id = "cmd-a"
        store.close_window("cmd-a", closing)
        assert store.open_windows() == []
        again = report("fr-synth-b")
        again.command_id = "cmd-a"
        with pytest.raises(WindowNotOpen):
            store.close_window("cmd-a", again)
        assert store.field_report("fr-synth-b") is None
        assert {e.kind for e in store.outbox_entries()} == {"decision", "field_report"}


def test_policy_lineage_follows_decisions(path: Path) -> None:
    with TamiyoStore(path) as store:
        assert store.current_policy_version() is None
        assert store.record_policy_version("v1", "start")
        assert not store.record_policy_version("v1", "start")
        record = decision("cmd-b")
        record.policy_version = "v2"
        store.record_decision(record, None)
        lineage = store.policy_lineage()
        assert [(r.version, r.parent_version) for r in lineage] == [("v1", ""), ("v2", "v1")]
        assert store.current_policy_version() == "v2"


def test_normaliser_statistics_persist_through_the_store(path: Path) -> None:
    with TamiyoStore(path) as store:
        table = store.normalizer_store()
        assert table.load() is None
        normalizer = FeatureNormalizer(TAMIYO_SCHEMA, table, flush_every=1)
        spec = TAMIYO_SCHEMA.node("global")
        values = torch.rand(4, len(spec.continuous))
        normalizer.normalize("global", values, torch.ones_like(values), update=True)
        normalizer.flush()
        saved = normalizer.states()
    with TamiyoStore(path) as store:
        loaded = store.normalizer_store().load()
        assert loaded is not None and loaded["global"] == saved["global"]
        assert store.normalizer_store("other").load() is None
        store.save_normalizer("x", {"global": NormalizerState([1.0], [2.0], [3.0])})
        assert store.load_normalizer("x") == {"global": NormalizerState([1.0], [2.0], [3.0])}


def test_retention_deletes_old_published_records_and_keeps_pending(path: Path) -> None:
    clock = ManualClock(wall_ns=100 * DAY_NS)
    with TamiyoStore(path, clock=clock) as store:
        store.add_field_report(report("fr-old-published", issued_ns=10 * DAY_NS))
        store.add_field_report(report("fr-old-pending", issued_ns=10 * DAY_NS))
        store.add_field_report(report("fr-new", issued_ns=95 * DAY_NS))
        store.record_decision(decision("cmd-old", issued_ns=10 * DAY_NS), None)
        entries = {e.ref_id: e for e in store.outbox_entries()}
        store.mark_published([entries["fr-old-published"], entries["dec-cmd-old"]])
        result = store.apply_retention(30.0)
        assert (result.field_reports, result.decisions, result.kept_pending) == (1, 1, 1)
        remaining = {s.report.report_id for s in store.field_reports()}
        assert remaining == {"fr-old-pending", "fr-new"}
        assert store.decision("cmd-old") is None
        assert {e.ref_id for e in store.outbox_entries()} == {"fr-old-pending", "fr-new"}


def test_field_reports_filter_by_outcome_and_status(path: Path) -> None:
    with TamiyoStore(path) as store:
        regression = report("fr-2")
        regression.outcome = pb.FIELD_REPORT_OUTCOME_REGRESSION
        store.add_field_reports([report("fr-1"), regression])
        entry = next(e for e in store.outbox_entries() if e.ref_id == "fr-1")
        store.mark_dropped(entry, 3, "bus down")
        assert [s.report.report_id for s in store.field_reports(status="dropped")] == ["fr-1"]
        assert store.field_reports(status="dropped")[0].last_error == "bus down"
        by_outcome = store.field_reports(outcome=pb.FIELD_REPORT_OUTCOME_REGRESSION)
        assert [s.report.report_id for s in by_outcome] == ["fr-2"]
        with pytest.raises(ValueError):
            store.field_reports(status="gone")  # type: ignore[arg-type]


def test_garbage_file_is_a_typed_corruption_error(path: Path) -> None:
    path.write_bytes(b"this is not a database, just bytes " * 200)
    with pytest.raises(StoreCorrupted, match="damaged or not a Tamiyo store"):
        TamiyoStore(path)


def test_damaged_page_is_caught_on_open(path: Path) -> None:
    with TamiyoStore(path) as store:
        store.add_field_reports([report(f"fr-{index}") for index in range(400)])
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 8 * page
    for offset in range(3 * page, 6 * page, 7):  # scribble over b-tree pages, keep the header
        data[offset] = 0xA5
    path.write_bytes(bytes(data))
    with pytest.raises(StoreCorrupted):
        TamiyoStore(path)


def test_failed_write_is_a_typed_error_and_rolls_back(path: Path) -> None:
    with TamiyoStore(path) as store:
        store.add_field_report(report("fr-first"))
        assert store._db is not None
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count = {pages}")  # the disk is now "full"
        big = report("fr-big")
        big.notes = "x" * 200_000
        with pytest.raises(StoreWriteError, match="add field report failed") as info:
            store.add_field_report(big)
        assert "full" in info.value.cause
        store._db.execute("PRAGMA max_page_count = 1000000")
        assert [s.report.report_id for s in store.field_reports()] == ["fr-first"]
        assert len(store.outbox_entries()) == 1


def test_closed_store_raises(path: Path) -> None:
    store = TamiyoStore(path)
    store.close()
    with pytest.raises(StoreClosed):
        store.add_field_report(report())


def test_migrations_bring_an_old_database_up_to_date(path: Path) -> None:
    with TamiyoStore(path, migrations=MIGRATIONS[:1]) as old:
        assert old.schema_version() == 1
    insert_old_report(path, report())
    with TamiyoStore(path) as store:
        assert store.schema_version() == SCHEMA_VERSION
        assert store.count_field_reports() == 1
        store.save_normalizer("x", {"global": NormalizerState([1.0], [2.0], [3.0])})  # migration 2's table


def test_newer_schema_is_refused(path: Path) -> None:
    TamiyoStore(path).close()
    db = sqlite3.connect(path)
    db.execute("INSERT INTO schema_migrations VALUES (99, 'from the future', 0)")
    db.commit()
    db.close()
    with pytest.raises(StoreSchemaError) as info:
        TamiyoStore(path)
    assert (info.value.found, info.value.supported) == (99, SCHEMA_VERSION)


def test_missing_store_is_not_created_when_asked(path: Path) -> None:
    from esper.tamiyo.records.errors import StoreError

    with pytest.raises(StoreError, match="does not exist"):
        TamiyoStore(path, create=False)
    assert not path.exists()


def test_a_store_of_the_first_contract_is_refused_not_misread(path: Path) -> None:
    TamiyoStore(path).close()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("DROP TABLE leyline_contract")  # as written before the contract version was recorded
    db.close()
    with pytest.raises(ContractVersionMismatch) as info:
        TamiyoStore(path)
    assert (info.value.found, info.value.expected) == (1, CONTRACT_VERSION)
