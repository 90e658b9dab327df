"""The outbox in the store: what is due, what was published, retried or dropped."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import cast

from esper.tamiyo.records.connection import StoreConnection
from esper.tamiyo.records.schema import (
    HOLD_ALL,
    OUTBOX_SELECT,
    OUTBOX_STATUSES,
    OUTBOX_TABLES,
    RELEASE_ALL,
    RELEASED,
    SET_HORIZON,
    OutboxEntry,
    OutboxKind,
    OutboxStatus,
    record_checksum,
)


class OutboxRows(StoreConnection):
    """The outbox in the store: what is due, what was published, retried or dropped."""

    def due_outbox(self, now_ns: int, limit: int = 256, *, hold: bool = False) -> list[OutboxEntry]:
        """Pending reports and decisions whose next attempt is due and that their run's release horizon
        covers, oldest first. A run without a horizon has all of its entries released, or, with `hold`,
        none (until `release_through` gives it one)."""
        where = f"status = 'pending' AND next_attempt_ns <= ? AND {RELEASED}"
        bound = HOLD_ALL if hold else RELEASE_ALL
        with self._read("read outbox") as db:
            rows = db.execute(
                OUTBOX_SELECT.format(where=where) + " ORDER BY 7 LIMIT ?",
                (now_ns, bound, now_ns, bound, limit),
            ).fetchall()
        return self._verified_entries(rows)

    def outbox_entries(self, status: OutboxStatus | None = None) -> list[OutboxEntry]:
        """Every outbox entry (optionally of one status): field reports, then decisions."""
        where, params = ("status = ?", (status, status)) if status else ("1", ())
        with self._read("read outbox") as db:
            rows = db.execute(OUTBOX_SELECT.format(where=where), params).fetchall()
        return self._verified_entries(rows)

    def _verified_entries(self, rows: Sequence[Sequence[object]]) -> list[OutboxEntry]:
        entries = []
        for row in rows:
            kind, ref_id, command_id, blob, *_, run, issued, outcome, checksum = row
            payload = cast(bytes, blob)
            if kind == "field_report":
                expected = record_checksum(payload, ref_id, command_id, run, outcome, issued)
            else:
                expected = record_checksum(payload, command_id, ref_id, run, issued)
            if expected != checksum:
                self._corrupt(
                    str(kind).replace("_", " "), str(ref_id if kind == "field_report" else command_id)
                )
                continue
            entries.append(OutboxEntry(*row[:8]))  # type: ignore[arg-type]
        return entries

    def next_outbox_due_ns(self, *, hold: bool = False) -> int | None:
        """When the earliest pending entry that may leave (as in `due_outbox`) is due, or None when none
        is pending or every pending one waits for a checkpoint."""
        bound = HOLD_ALL if hold else RELEASE_ALL
        with self._read("read outbox") as db:
            row = db.execute(
                "SELECT MIN(due) FROM (SELECT MIN(next_attempt_ns) AS due FROM field_reports"
                f" WHERE status = 'pending' AND {RELEASED} UNION ALL SELECT MIN(next_attempt_ns)"
                f" FROM decisions WHERE status = 'pending' AND {RELEASED})",
                (bound, bound),
            ).fetchone()
        return None if row[0] is None else int(row[0])

    def release_through(self, training_run_id: str, step: int) -> None:
        """The checkpoint of `step` is durable: the run's records written as of steps up to `step` may be
        published from now on (one fsynced statement). The horizon only moves forward here; a resume
        sets it back to the restored step (`abandon_after`)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        with self._statement("release records") as db:
            db.execute(
                SET_HORIZON.format(step="MAX(step, excluded.step)"),
                (training_run_id, int(step), self._clock.wall_ns()),
            )

    def release_all(self) -> None:
        """Release every record stored (a completed run): each run's horizon moves to the step of its
        newest record, in one transaction."""
        now = self._clock.wall_ns()
        with self._transaction("release all records") as db:
            rows = db.execute(
                "SELECT training_run_id, MAX(as_of_step) FROM (SELECT training_run_id, as_of_step FROM"
                " decisions UNION ALL SELECT training_run_id, as_of_step FROM field_reports)"
                " WHERE as_of_step IS NOT NULL GROUP BY training_run_id"
            ).fetchall()
            db.executemany(
                SET_HORIZON.format(step="MAX(step, excluded.step)"),
                [(run, int(step), now) for run, step in rows],
            )

    def release_horizon(self, training_run_id: str) -> int | None:
        """The newest step whose records of `training_run_id` may be published, or None when none is set."""
        with self._read("read release horizon") as db:
            row = db.execute(
                "SELECT step FROM release_horizons WHERE run_id = ?", (training_run_id,)
            ).fetchone()
        return None if row is None else int(row[0])

    def pending_count(self, kind: OutboxKind = "field_report") -> int:
        """Entries of `kind` waiting for publication (read from the pending index: cheap)."""
        table, _ = OUTBOX_TABLES[kind]
        with self._read("count pending") as db:
            return int(db.execute(f"SELECT COUNT(*) FROM {table} WHERE status = 'pending'").fetchone()[0])

    def outbox_counts(self, kind: OutboxKind = "field_report") -> dict[OutboxStatus, int]:
        """Entries of `kind` per status (a full scan: for reports and tests, not the hot path)."""
        table, _ = OUTBOX_TABLES[kind]
        with self._read("count outbox") as db:
            counts = dict(db.execute(f"SELECT status, COUNT(*) FROM {table} GROUP BY status").fetchall())
        return {status: int(counts.get(status, 0)) for status in OUTBOX_STATUSES}

    @staticmethod
    def _entry_key(entry: OutboxEntry) -> tuple[str, str, str]:
        table, column = OUTBOX_TABLES[entry.kind]
        return table, column, entry.ref_id if entry.kind == "field_report" else entry.command_id

    @staticmethod
    def _forget_closed_window(db: sqlite3.Connection, entry: OutboxEntry) -> None:
        # A report that left can never be taken back: its window can no longer be reopened.
        if entry.kind == "field_report":
            db.execute("DELETE FROM closed_windows WHERE report_id = ?", (entry.ref_id,))

    def mark_published(self, entries: Sequence[OutboxEntry]) -> None:
        """Entries delivered to the bus (one transaction for the batch)."""
        now = self._clock.wall_ns()
        with self._transaction("mark published") as db:
            for entry in entries:
                self._forget_closed_window(db, entry)
                table, column, key = self._entry_key(entry)
                db.execute(
                    f"UPDATE {table} SET status = 'published', attempts = attempts + 1, last_error = '',"
                    f" updated_at_ns = ? WHERE {column} = ? AND status = 'pending'",
                    (now, key),
                )

    def schedule_retry(self, entry: OutboxEntry, attempts: int, next_attempt_ns: int, error: str) -> None:
        """A failed attempt: count it and set the time of the next one."""
        table, column, key = self._entry_key(entry)
        with self._transaction("schedule retry") as db:
            db.execute(
                f"UPDATE {table} SET attempts = ?, next_attempt_ns = ?, last_error = ?, updated_at_ns = ?"
                f" WHERE {column} = ? AND status = 'pending'",
                (attempts, next_attempt_ns, error, self._clock.wall_ns(), key),
            )

    def mark_dropped(self, entry: OutboxEntry, attempts: int, error: str) -> None:
        """Past the retry limit: kept, queryable as dropped, never retried."""
        table, column, key = self._entry_key(entry)
        with self._transaction("mark dropped") as db:
            self._forget_closed_window(db, entry)
            db.execute(
                f"UPDATE {table} SET status = 'dropped', attempts = ?, last_error = ?, updated_at_ns = ?"
                f" WHERE {column} = ? AND status = 'pending'",
                (attempts, error, self._clock.wall_ns(), key),
            )
