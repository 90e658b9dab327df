"""Decision records, their observation windows and the policy lineage in the store."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from esper.leyline import (
    pb,
    serialize,
)
from esper.tamiyo.records.errors import RecordRejected, WindowNotOpen
from esper.tamiyo.records.field_report_rows import FieldReportRows
from esper.tamiyo.records.schema import (
    SET_HORIZON,
    AbandonResult,
    ObservationWindow,
    PolicyVersionRecord,
    record_checksum,
    window_checksum,
)


class DecisionRows(FieldReportRows):
    """Decision records, their observation windows and the policy lineage in the store."""

    def record_decision(self, record: pb.DecisionRecord, window: ObservationWindow | None) -> None:
        """Store a decision, queue it for publication and open its window, in one transaction.

        A decision taken by another policy version than the current one extends the policy lineage in
        the same transaction. The decision is written as of its packet's global step (see
        `release_through`).
        """
        if not record.command_id or not record.decision_id or not record.HasField("issued_at"):
            raise RecordRejected(
                self.path, "decision", record.decision_id, "command_id/decision_id/issued_at", "are required"
            )
        if window is not None and window.command_id != record.command_id:
            raise ValueError(f"window {window.command_id!r} is not the decision's ({record.command_id!r})")
        payload = serialize(record)
        issued = record.issued_at.ToNanoseconds()
        checksum = record_checksum(
            payload, record.command_id, record.decision_id, record.training_run_id, issued
        )
        window_row = None if window is None else self._window_row(window)
        as_of_step = record.packet.global_step if record.HasField("packet") else None
        now = self._clock.wall_ns()
        with self._transaction("record decision") as db:
            try:
                db.execute(
                    "INSERT INTO decisions (command_id, decision_id, training_run_id, issued_at_ns, record,"
                    " next_attempt_ns, updated_at_ns, checksum, as_of_step)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        record.command_id,
                        record.decision_id,
                        record.training_run_id,
                        issued,
                        payload,
                        now,
                        now,
                        checksum,
                        as_of_step,
                    ),
                )
            except sqlite3.IntegrityError as exc:
                raise RecordRejected(
                    self.path, "decision", record.decision_id, "command_id", "is already stored"
                ) from exc
            if window_row is not None:
                db.execute(
                    f"INSERT INTO windows ({self._WINDOW_COLUMNS}, checksum)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (*window_row, window_checksum(window_row)),
                )
            self._extend_lineage(db, record.policy_version, "decision", now)

    @staticmethod
    def _window_row(window: ObservationWindow) -> tuple[object, ...]:
        """The window's columns with the types they read back as (so its checksum matches on reading)."""
        params = window.baseline_params
        return (
            str(window.command_id),
            str(window.training_run_id),
            int(window.start_epoch),
            int(window.window_epochs),
            int(window.opened_at_ns),
            str(window.policy_version),
            int(window.action),
            int(window.command_type),
            str(window.slot_id),
            str(window.seed_id),
            str(window.blueprint_id),
            float(window.baseline_accuracy),
            float(window.baseline_loss),
            None if params is None else float(params),
        )

    def decision(self, command_id: str) -> pb.DecisionRecord | None:
        """The decision record of `command_id`, or None (also when it fails its checksum: with an event)."""
        with self._read("read decision") as db:
            row = db.execute(
                "SELECT decision_id, training_run_id, issued_at_ns, record, checksum FROM decisions"
                " WHERE command_id = ?",
                (command_id,),
            ).fetchone()
        if row is None:
            return None
        decision_id, run, issued, blob, checksum = row
        if record_checksum(blob, command_id, decision_id, run, issued) != checksum:
            self._corrupt("decision", command_id)
            return None
        return self.parse_stored(pb.DecisionRecord, blob, f"decision {command_id}")

    def count_decisions(self) -> int:
        """How many decision records are stored."""
        with self._read("count decisions") as db:
            return int(db.execute("SELECT COUNT(*) FROM decisions").fetchone()[0])

    _WINDOW_COLUMNS = (
        "command_id, training_run_id, start_epoch, window_epochs, opened_at_ns, policy_version, action,"
        " command_type, slot_id, seed_id, blueprint_id, baseline_accuracy, baseline_loss, baseline_params"
    )

    def open_windows(self, training_run_id: str | None = None) -> list[ObservationWindow]:
        """Windows not closed yet (all runs, or one), oldest first."""
        where, params = ("WHERE training_run_id = ?", (training_run_id,)) if training_run_id else ("", ())
        with self._read("read windows") as db:
            rows = db.execute(
                f"SELECT {self._WINDOW_COLUMNS}, checksum FROM windows {where}"
                " ORDER BY opened_at_ns, command_id",
                params,
            ).fetchall()
        return self._verified_windows(rows)

    def _verified_windows(self, rows: Sequence[Sequence[object]]) -> list[ObservationWindow]:
        windows = []
        for row in rows:
            if window_checksum(row[:-1]) != row[-1]:
                self._corrupt("window", str(row[0]))
                continue
            windows.append(ObservationWindow(*row[:-1]))  # type: ignore[arg-type]
        return windows

    def due_windows(self, training_run_id: str, epoch: int) -> list[ObservationWindow]:
        """Open windows of `training_run_id` that a packet at `epoch` closes."""
        with self._read("read due windows") as db:
            rows = db.execute(
                f"SELECT {self._WINDOW_COLUMNS}, checksum FROM windows WHERE training_run_id = ?"
                " AND start_epoch <= ? AND start_epoch + window_epochs <= ?"
                " ORDER BY opened_at_ns, command_id",
                (training_run_id, epoch, epoch),
            ).fetchall()
        return self._verified_windows(rows)

    def close_window(self, command_id: str, report: pb.FieldReport, *, as_of_step: int | None = None) -> None:
        """Write the window's report, queue it and forget the window, in one transaction.

        `as_of_step` is the training step the report was written as of (that of the packet that closed
        the window): the report waits in the outbox until its run's release horizon reaches it, and until
        it leaves (published or dropped) the window is kept aside, for a resume to an earlier step to
        reopen (`abandon_after`)."""
        self._check_report(report)
        if report.command_id != command_id:
            raise RecordRejected(
                self.path, "field report", report.report_id, "command_id", f"is not {command_id!r}"
            )
        now = self._clock.wall_ns()
        with self._transaction("close window") as db:
            if as_of_step is not None:
                db.execute(
                    f"INSERT INTO closed_windows ({self._WINDOW_COLUMNS}, checksum, report_id, as_of_step)"
                    f" SELECT {self._WINDOW_COLUMNS}, checksum, ?, ? FROM windows WHERE command_id = ?",
                    (report.report_id, int(as_of_step), command_id),
                )
            gone = db.execute("DELETE FROM windows WHERE command_id = ?", (command_id,)).rowcount
            if gone != 1:
                raise WindowNotOpen(self.path, command_id)
            self._insert_report(db, report, now, as_of_step)

    def abandon_after(self, training_run_id: str, step: int) -> AbandonResult:
        """Cut the run's timeline back to a restored checkpoint at `step`, in one transaction.

        Decisions of `training_run_id` taken after `step` (by their packet's global step) belong to a
        timeline a resumed run replaces: their windows are forgotten, and they and their field reports,
        where still pending, become `dropped` with an `abandoned` reason (never published, so never
        learned from). A report of an earlier decision written after `step` was measured on that timeline
        too: it is dropped the same way and its window reopened, for the resumed run to close again.

        What the outbox had already published before the crash cannot be recalled: it is counted, so the
        caller can announce it (a run that holds its records until a checkpoint covers them has published
        none). The run's release horizon becomes `step` in the same transaction: what the restored
        checkpoint covers may leave, and what the resumed run decides after it waits for the next
        checkpoint (also when the horizon was past `step`: a newer checkpoint that turned out damaged).
        """
        reason = f"abandoned: decided after step {step}, past the checkpoint the run resumed from"
        now = self._clock.wall_ns()
        result = AbandonResult()
        with self._transaction("abandon timeline") as db:
            db.execute(SET_HORIZON.format(step="excluded.step"), (training_run_id, int(step), now))
            rows = db.execute(
                "SELECT command_id, decision_id, issued_at_ns, record, status, checksum FROM decisions"
                " WHERE training_run_id = ?",
                (training_run_id,),
            ).fetchall()
            for command_id, decision_id, issued, blob, status, checksum in rows:
                if record_checksum(blob, command_id, decision_id, training_run_id, issued) != checksum:
                    self._corrupt("decision", command_id)  # unreadable: never published, so never learned
                    continue
                record = self.parse_stored(pb.DecisionRecord, blob, f"decision {command_id}")
                if record.packet.global_step <= step:
                    continue
                result.decisions += 1
                if status == "published":
                    result.already_published += 1
                db.execute("DELETE FROM windows WHERE command_id = ?", (command_id,))
                for table in ("decisions", "field_reports"):
                    changed = db.execute(
                        f"UPDATE {table} SET status = 'dropped', last_error = ?, updated_at_ns = ?"
                        " WHERE command_id = ? AND status = 'pending'",
                        (reason, now, command_id),
                    ).rowcount
                    if table == "field_reports":
                        result.field_reports += changed
                result.already_published += int(
                    db.execute(
                        "SELECT COUNT(*) FROM field_reports WHERE command_id = ? AND status = 'published'",
                        (command_id,),
                    ).fetchone()[0]
                )
                db.execute("DELETE FROM closed_windows WHERE command_id = ?", (command_id,))
            self._reopen_after(db, training_run_id, step, reason, result)
        return result

    def _reopen_after(
        self, db: sqlite3.Connection, run: str, step: int, reason: str, result: AbandonResult
    ) -> None:
        """Reports of kept decisions written after `step`: a pending one is dropped and its window reopened;
        a published one (it left before the crash) is counted."""
        reopened = db.execute(
            "SELECT command_id, report_id FROM closed_windows WHERE training_run_id = ? AND as_of_step > ?",
            (run, step),
        ).fetchall()
        for command_id, report_id in reopened:
            result.field_reports += db.execute(
                "UPDATE field_reports SET status = 'dropped', last_error = ?, updated_at_ns = ?"
                " WHERE report_id = ? AND status = 'pending'",
                (reason, self._clock.wall_ns(), report_id),
            ).rowcount
            db.execute(
                f"INSERT INTO windows ({self._WINDOW_COLUMNS}, checksum) SELECT {self._WINDOW_COLUMNS},"
                " checksum FROM closed_windows WHERE command_id = ?",
                (command_id,),
            )
            db.execute("DELETE FROM closed_windows WHERE command_id = ?", (command_id,))
            result.windows_reopened += 1
        result.already_published += int(
            db.execute(
                "SELECT COUNT(*) FROM field_reports AS r WHERE training_run_id = ? AND as_of_step > ?"
                " AND status = 'published' AND NOT EXISTS (SELECT 1 FROM decisions AS d WHERE"
                " d.command_id = r.command_id AND d.as_of_step > ?)",
                (run, step, step),
            ).fetchone()[0]
        )

    # -- policy lineage -----------------------------------------------------------------------------

    def _extend_lineage(self, db: sqlite3.Connection, version: str, source: str, now_ns: int) -> bool:
        if not version:
            return False
        row = db.execute("SELECT version FROM policy_versions ORDER BY seq DESC LIMIT 1").fetchone()
        current = row[0] if row else ""
        if current == version:
            return False
        db.execute(
            "INSERT INTO policy_versions (version, parent_version, source, activated_at_ns)"
            " VALUES (?, ?, ?, ?)",
            (version, current, source, now_ns),
        )
        return True

    def record_policy_version(self, version: str, source: str) -> bool:
        """Make `version` current (its parent is the current one); False if it already is current."""
        if not version:
            raise RecordRejected(self.path, "policy version", version, "version", "is empty")
        with self._transaction("record policy version") as db:
            return self._extend_lineage(db, version, source, self._clock.wall_ns())

    def current_policy_version(self) -> str | None:
        """The version deciding now, or None before the first one is recorded."""
        lineage = self.policy_lineage(limit=1)
        return lineage[-1].version if lineage else None

    def policy_lineage(self, limit: int | None = None) -> list[PolicyVersionRecord]:
        """Policy versions in activation order (the last `limit` of them)."""
        tail = f" LIMIT {int(limit)}" if limit is not None else ""
        with self._read("read policy lineage") as db:
            rows = db.execute(
                "SELECT version, parent_version, source, activated_at_ns FROM policy_versions"
                " ORDER BY seq DESC" + tail
            ).fetchall()
        return [PolicyVersionRecord(str(v), str(p), str(s), int(t)) for v, p, s, t in reversed(rows)]
