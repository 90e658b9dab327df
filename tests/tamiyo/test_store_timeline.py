"""A resumed run's store keeps one timeline: what was decided past the restored checkpoint is abandoned."""

from __future__ import annotations

from pathlib import Path

from esper.leyline import pb
from esper.tamiyo.records.store import TamiyoStore
from tests.tamiyo.test_store import decision, window


def _decided(store: TamiyoStore, command_id: str, step: int, *, opened: bool = True) -> None:
    record = decision(command_id)
    record.packet.global_step = step
    record.packet.training_run_id = "run-1"
    store.record_decision(record, window(command_id) if opened else None)


def _report(command_id: str) -> pb.FieldReport:
    report = pb.FieldReport(
        report_id=f"fr-{command_id}",
        command_id=command_id,
        training_run_id="run-1",
        outcome=pb.FIELD_REPORT_OUTCOME_SUCCESS,
        observation_window_epochs=1,
        tamiyo_policy_version="v1",
    )
    report.issued_at.FromNanoseconds(1_700_000_000_000_000_000)
    return report


def test_decisions_past_the_checkpoint_are_abandoned_never_published(tmp_path: Path) -> None:
    with TamiyoStore(tmp_path / "tamiyo.sqlite3") as store:
        _decided(store, "cmd-a", 20)  # before the checkpoint at step 23: kept
        _decided(store, "cmd-b", 40)  # after it: its window closed too, into a pending report
        store.close_window("cmd-b", _report("cmd-b"))
        _decided(store, "cmd-c", 45)  # after it, window still open
        _decided(store, "cmd-d", 46)  # after it, already published before the crash
        published = [e for e in store.outbox_entries("pending") if e.command_id == "cmd-d"]
        store.mark_published(published)

        cut = store.abandon_after("run-1", 23)

        assert (cut.decisions, cut.field_reports, cut.already_published) == (3, 1, 1)
        assert [w.command_id for w in store.open_windows("run-1")] == ["cmd-a"]
        pending = {(e.kind, e.command_id) for e in store.outbox_entries("pending")}
        assert pending == {("decision", "cmd-a")}  # nothing abandoned is left to publish
        dropped = store.outbox_entries("dropped")
        assert {e.command_id for e in dropped} == {"cmd-b", "cmd-c"}
        assert all(e.last_error.startswith("abandoned") for e in dropped)
        # The resumed run decides those steps again: one live timeline per step.
        _decided(store, "cmd-b2", 40)
        live = [e for e in store.outbox_entries() if e.kind == "decision" and e.status != "dropped"]
        steps = sorted(store.decision(e.command_id).packet.global_step for e in live)  # type: ignore[union-attr]
        assert steps == [20, 40, 46]


def test_a_report_written_past_the_checkpoint_is_dropped_and_its_window_reopened(tmp_path: Path) -> None:
    """The window of a kept decision closed after the checkpoint, on the timeline the resume replaces: the
    resumed run must measure it again, so the report goes and the window comes back as it was."""
    with TamiyoStore(tmp_path / "tamiyo.sqlite3") as store:
        _decided(store, "cmd-a", 20)
        _decided(store, "cmd-b", 21)
        opened = {w.command_id: w for w in store.open_windows("run-1")}
        store.close_window("cmd-a", _report("cmd-a"), as_of_step=22)  # before the checkpoint at 23: kept
        store.close_window("cmd-b", _report("cmd-b"), as_of_step=30)  # after it

        cut = store.abandon_after("run-1", 23)

        assert (cut.decisions, cut.field_reports, cut.windows_reopened, cut.already_published) == (0, 1, 1, 0)
        assert store.open_windows("run-1") == [opened["cmd-b"]]
        reports = {r.report.command_id: r.status for r in store.field_reports()}
        assert reports == {"cmd-a": "pending", "cmd-b": "dropped"}
        # The resumed run closes it again, into a report of its own timeline.
        store.close_window("cmd-b", _second_report("cmd-b"), as_of_step=30)
        assert store.open_windows("run-1") == []


def test_a_report_that_left_before_the_crash_is_counted_and_its_window_stays_closed(tmp_path: Path) -> None:
    with TamiyoStore(tmp_path / "tamiyo.sqlite3") as store:
        _decided(store, "cmd-a", 20)
        store.close_window("cmd-a", _report("cmd-a"), as_of_step=30)
        store.mark_published([e for e in store.outbox_entries("pending") if e.kind == "field_report"])

        cut = store.abandon_after("run-1", 23)

        assert (cut.field_reports, cut.windows_reopened, cut.already_published) == (0, 0, 1)
        assert store.open_windows("run-1") == []  # reopening it would report the decision twice


def _second_report(command_id: str) -> pb.FieldReport:
    report = _report(command_id)
    report.report_id = f"fr-{command_id}-again"
    return report
