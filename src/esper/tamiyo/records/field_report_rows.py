"""Field reports in the store: written with their checksum, read back verified."""

from __future__ import annotations

import sqlite3
import zlib
from collections.abc import Sequence

from esper.leyline import (
    ContractViolation,
    MalformedMessage,
    parse,
    pb,
    serialize,
    validate_field_report,
)
from esper.tamiyo.records.connection import StoreConnection
from esper.tamiyo.records.errors import RecordRejected, StoreCorrupted
from esper.tamiyo.records.schema import OUTBOX_STATUSES, M, OutboxStatus, StoredFieldReport, record_checksum


class FieldReportRows(StoreConnection):
    """Field reports in the store: written with their checksum, read back verified."""

    def _check_report(self, report: pb.FieldReport) -> None:
        try:
            validate_field_report(report)
        except ContractViolation as exc:
            raise RecordRejected(self.path, "field report", report.report_id, exc.field, exc.reason) from exc
        if not report.report_id.startswith("fr-"):
            raise RecordRejected(self.path, "field report", report.report_id, "report_id", "must start 'fr-'")

    _INSERT_REPORT = (
        "INSERT INTO field_reports (report_id, command_id, training_run_id, outcome, issued_at_ns, report,"
        " next_attempt_ns, updated_at_ns, checksum) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )
    _INSERT_REPORT_AS_OF = (
        "INSERT INTO field_reports (report_id, command_id, training_run_id, outcome, issued_at_ns, report,"
        " next_attempt_ns, updated_at_ns, checksum, as_of_step) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )

    def _report_row(self, report: pb.FieldReport, now_ns: int) -> tuple[object, ...]:
        report_id, command_id, run = report.report_id, report.command_id, report.training_run_id
        outcome = int(report.outcome)
        issued = report.issued_at.seconds * 1_000_000_000 + report.issued_at.nanos
        blob = serialize(report)
        # `checksum` inlined (the hot path): the same bytes as "\x1f".join(str(key) for key in keys).
        keys = f"{report_id}\x1f{command_id}\x1f{run}\x1f{outcome}\x1f{issued}".encode()
        checksum = zlib.crc32(blob, zlib.crc32(keys))
        return (report_id, command_id, run, outcome, issued, blob, now_ns, now_ns, checksum)

    def _insert_report(
        self, db: sqlite3.Connection, report: pb.FieldReport, now_ns: int, as_of_step: int | None = None
    ) -> None:
        try:
            if as_of_step is None:
                db.execute(self._INSERT_REPORT, self._report_row(report, now_ns))
            else:
                db.execute(self._INSERT_REPORT_AS_OF, (*self._report_row(report, now_ns), int(as_of_step)))
        except sqlite3.IntegrityError as exc:
            raise RecordRejected(
                self.path, "field report", report.report_id, "report_id", "is already stored"
            ) from exc

    def add_field_report(self, report: pb.FieldReport) -> None:
        """Store `report` and queue it for publication, in one transaction.

        Raises `RecordRejected` for a report without `issued_at` (retention ages reports by it), without
        its ids, or with a `report_id` already used.
        """
        # The hot path of every acknowledged report: one autocommit INSERT (atomic and fsynced like a
        # transaction, without the BEGIN and COMMIT round trips), no context managers.
        self._check_report(report)
        row = self._report_row(report, self._clock.wall_ns())
        with self._lock:
            db = self._connection("add field report")
            try:
                db.execute(self._INSERT_REPORT, row)
            except sqlite3.IntegrityError as exc:
                raise RecordRejected(
                    self.path, "field report", report.report_id, "report_id", "is already stored"
                ) from exc
            except sqlite3.Error as exc:
                raise self._error("add field report", exc) from exc
            self._advance_mark()

    def add_field_reports(self, reports: Sequence[pb.FieldReport]) -> None:
        """Store several reports in one transaction (an import): all of them or none."""
        for report in reports:
            self._check_report(report)
        now = self._clock.wall_ns()
        with self._transaction("add field reports") as db:
            for report in reports:
                self._insert_report(db, report, now)

    def field_report(self, report_id: str) -> StoredFieldReport | None:
        """One report with its publication state, or None."""
        found = self._query_reports("WHERE report_id = ?", (report_id,))
        return found[0] if found else None

    def field_reports(
        self,
        *,
        outcome: int | None = None,
        status: OutboxStatus | None = None,
        training_run_id: str | None = None,
        limit: int | None = None,
    ) -> list[StoredFieldReport]:
        """Reports in issue order, optionally filtered by outcome, publication status and run."""
        clauses: list[str] = []
        params: list[object] = []
        if outcome is not None:
            clauses.append("outcome = ?")
            params.append(outcome)
        if status is not None:
            if status not in OUTBOX_STATUSES:
                raise ValueError(f"status must be one of {OUTBOX_STATUSES}, got {status!r}")
            clauses.append("status = ?")
            params.append(status)
        if training_run_id is not None:
            clauses.append("training_run_id = ?")
            params.append(training_run_id)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        tail = f" LIMIT {int(limit)}" if limit is not None else ""
        return self._query_reports(f"{where} ORDER BY issued_at_ns, report_id{tail}", tuple(params))

    def _query_reports(self, tail: str, params: tuple[object, ...]) -> list[StoredFieldReport]:
        with self._read("read field reports") as db:
            rows = db.execute(
                "SELECT report_id, command_id, training_run_id, outcome, issued_at_ns, report, checksum,"
                " status, attempts, last_error FROM field_reports " + tail,
                params,
            ).fetchall()
        result = []
        for report_id, command_id, run, outcome, issued, blob, checksum, status, attempts, last_error in rows:
            if record_checksum(blob, report_id, command_id, run, outcome, issued) != checksum:
                self._corrupt("field report", str(report_id))
                continue
            report = self.parse_stored(pb.FieldReport, blob, f"field report {report_id}")
            result.append(StoredFieldReport(report, status, int(attempts), str(last_error)))
        return result

    def count_field_reports(self) -> int:
        """How many field reports are stored."""
        with self._read("count field reports") as db:
            return int(db.execute("SELECT COUNT(*) FROM field_reports").fetchone()[0])

    def parse_stored(self, message_type: type[M], blob: bytes, what: str) -> M:
        """Parse a stored payload; bytes that do not parse mean a damaged store (`StoreCorrupted`)."""
        try:
            return parse(message_type, blob)
        except MalformedMessage as exc:
            raise StoreCorrupted(self.path, f"{what} does not parse: {exc.reason}") from exc
