"""TamiyoStore: the one owner of Tamiyo's durable state, in one SQLite file.

Decision records, field reports, open observation windows, the outbox, category registries, normaliser
statistics and the policy lineage live in one database (`tamiyo.sqlite3` in a run directory): WAL journal,
`synchronous=FULL`, one `BEGIN IMMEDIATE` transaction per state change. A call that returned has been
committed and fsynced, so a crash at any later instant keeps it. There are no sidecar files that could
drift from the database.

The schema is versioned: `schema_migrations` lists every migration applied, in order, and opening an older
database applies the missing ones; a database written by a newer Esper is refused. A damaged file, a
failed write, or a record that breaks its contract (a field report without `issued_at`) is a typed error
naming the file and the cause; nothing is dropped quietly.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from array import array
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

from google.protobuf.message import Message

from esper.leyline import (
    SYSTEM_CLOCK,
    Clock,
    ContractViolation,
    EsperError,
    MalformedMessage,
    guard_sqlite_contract,
    parse,
    pb,
    serialize,
    validate_field_report,
)
from esper.oona import Streams
from esper.tamiyo.graph import NormalizerState

OutboxStatus = Literal["pending", "published", "dropped"]
OutboxKind = Literal["field_report", "decision"]
OUTBOX_STATUSES: tuple[OutboxStatus, ...] = ("pending", "published", "dropped")
STREAM_OF_KIND: dict[OutboxKind, str] = {"field_report": Streams.FIELD_REPORTS, "decision": Streams.DECISIONS}
_NS_PER_DAY = 86_400 * 1_000_000_000
M = TypeVar("M", bound=Message)


# ------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------


class StoreError(EsperError):
    """Base of the storage manager's errors; `path` names the database."""

    def __init__(self, path: Path, message: str) -> None:
        self.path = path
        super().__init__(f"tamiyo store {path}: {message}")


class StoreCorrupted(StoreError):
    """The database file is damaged or is not a Tamiyo store; restore it from a copy or move it away."""

    def __init__(self, path: Path, detail: str) -> None:
        self.detail = detail
        super().__init__(path, f"database is damaged or not a Tamiyo store ({detail})")


class StoreWriteError(StoreError):
    """A write did not commit (disk full, read-only file, I/O error, lock timeout); nothing of it was kept."""

    def __init__(self, path: Path, operation: str, cause: str) -> None:
        self.operation = operation
        self.cause = cause
        super().__init__(path, f"{operation} failed and was rolled back: {cause}")


class StoreSchemaError(StoreError):
    """The database's schema is newer than this Esper knows, or a migration failed."""

    def __init__(self, path: Path, found: int, supported: int, detail: str = "") -> None:
        self.found = found
        self.supported = supported
        extra = f": {detail}" if detail else ""
        super().__init__(path, f"schema version {found}, this Esper supports up to {supported}{extra}")


class StoreClosed(StoreError):
    """The store was used after `close()`."""

    def __init__(self, path: Path, operation: str) -> None:
        super().__init__(path, f"{operation} after close()")


class RecordRejected(StoreError):
    """A record breaks its contract and was not stored (e.g. a field report without `issued_at`)."""

    def __init__(self, path: Path, kind: str, record_id: str, field: str, reason: str) -> None:
        self.kind = kind
        self.record_id = record_id
        self.field = field
        self.reason = reason
        super().__init__(path, f"{kind} {record_id!r} rejected: {field} {reason}")


class WindowNotOpen(StoreError):
    """A window was closed that is not open (closed already, or never opened)."""

    def __init__(self, path: Path, command_id: str) -> None:
        self.command_id = command_id
        super().__init__(path, f"no open observation window for command {command_id!r}")


# ------------------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObservationWindow:
    """An open window: the decision it observes and the baseline its outcome is measured against."""

    command_id: str
    training_run_id: str
    start_epoch: int
    window_epochs: int
    opened_at_ns: int
    policy_version: str
    action: int
    command_type: int
    slot_id: str
    seed_id: str
    blueprint_id: str
    baseline_accuracy: float
    baseline_loss: float
    baseline_params: float | None

    @property
    def closes_at_epoch(self) -> int:
        """The first packet epoch at which the window closes."""
        return self.start_epoch + self.window_epochs


@dataclass(frozen=True)
class OutboxEntry:
    """One message waiting for (or done with) publication: a field report or a decision record."""

    kind: OutboxKind
    ref_id: str
    command_id: str
    payload: bytes
    status: OutboxStatus
    attempts: int
    next_attempt_ns: int
    last_error: str

    @property
    def stream(self) -> str:
        """The bus stream this entry goes to."""
        return STREAM_OF_KIND[self.kind]


@dataclass(frozen=True)
class StoredFieldReport:
    """A field report with its publication state."""

    report: pb.FieldReport
    status: OutboxStatus
    attempts: int
    last_error: str


@dataclass(frozen=True)
class PolicyVersionRecord:
    """One entry of the policy lineage."""

    version: str
    parent_version: str
    source: str
    activated_at_ns: int


@dataclass
class AbandonResult:
    """What `abandon_after` cut back: decisions past the checkpoint, their reports still pending (now
    dropped), and entries the outbox had published before the crash."""

    decisions: int = 0
    field_reports: int = 0
    already_published: int = 0


@dataclass(frozen=True)
class RetentionResult:
    """What a retention pass removed."""

    field_reports: int
    decisions: int
    kept_pending: int


# ------------------------------------------------------------------------------------------------------
# Schema and migrations
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    """One step of the schema, applied once, in its own transaction."""

    version: int
    name: str
    statements: tuple[str, ...]


_OUTBOX_STATE = (
    "status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'published', 'dropped')),"
    " attempts INTEGER NOT NULL DEFAULT 0, next_attempt_ns INTEGER NOT NULL,"
    " last_error TEXT NOT NULL DEFAULT '', updated_at_ns INTEGER NOT NULL"
)
# kind -> (table, key column, key of the entry: its ref_id or its command_id)
_OUTBOX_TABLES: dict[OutboxKind, tuple[str, str]] = {
    "field_report": ("field_reports", "report_id"),
    "decision": ("decisions", "command_id"),
}
_OUTBOX_SELECT = (
    "SELECT 'field_report', report_id, command_id, report, status, attempts, next_attempt_ns, last_error"
    " FROM field_reports WHERE {where} UNION ALL"
    " SELECT 'decision', decision_id, command_id, record, status, attempts, next_attempt_ns, last_error"
    " FROM decisions WHERE {where}"
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "decisions and field reports with their outbox state, observation windows",
        (
            # Each record carries its own outbox state (no second copy of the payload): one row per write.
            "CREATE TABLE decisions (command_id TEXT PRIMARY KEY, decision_id TEXT NOT NULL,"
            " training_run_id TEXT NOT NULL, issued_at_ns INTEGER NOT NULL, record BLOB NOT NULL,"
            f" {_OUTBOX_STATE})",
            "CREATE INDEX decisions_due ON decisions (next_attempt_ns) WHERE status = 'pending'",
            "CREATE TABLE field_reports (report_id TEXT PRIMARY KEY, command_id TEXT NOT NULL,"
            " training_run_id TEXT NOT NULL, outcome INTEGER NOT NULL, issued_at_ns INTEGER NOT NULL,"
            f" report BLOB NOT NULL, {_OUTBOX_STATE}) WITHOUT ROWID",
            "CREATE INDEX field_reports_due ON field_reports (next_attempt_ns) WHERE status = 'pending'",
            "CREATE TABLE windows (command_id TEXT PRIMARY KEY, training_run_id TEXT NOT NULL,"
            " start_epoch INTEGER NOT NULL, window_epochs INTEGER NOT NULL, opened_at_ns INTEGER NOT NULL,"
            " policy_version TEXT NOT NULL, action INTEGER NOT NULL, command_type INTEGER NOT NULL,"
            " slot_id TEXT NOT NULL, seed_id TEXT NOT NULL, blueprint_id TEXT NOT NULL,"
            " baseline_accuracy REAL NOT NULL, baseline_loss REAL NOT NULL, baseline_params REAL)",
            "CREATE INDEX windows_close ON windows (training_run_id, start_epoch)",
        ),
    ),
    Migration(
        2,
        "category registries, normaliser statistics, policy lineage",
        (
            "CREATE TABLE registries (registry TEXT NOT NULL, key TEXT NOT NULL, idx INTEGER NOT NULL,"
            " PRIMARY KEY (registry, key), UNIQUE (registry, idx))",
            "CREATE TABLE normalizer (name TEXT NOT NULL, node_type TEXT NOT NULL, count BLOB NOT NULL,"
            " mean BLOB NOT NULL, m2 BLOB NOT NULL, PRIMARY KEY (name, node_type))",
            "CREATE TABLE policy_versions (seq INTEGER PRIMARY KEY AUTOINCREMENT, version TEXT NOT NULL,"
            " parent_version TEXT NOT NULL, source TEXT NOT NULL, activated_at_ns INTEGER NOT NULL)",
        ),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1].version

# sqlite3 messages that mean the file itself is damaged (as opposed to a failed write).
_CORRUPTION_MARKERS = ("malformed", "not a database", "file is encrypted", "corrupt")


def _is_corruption(exc: sqlite3.Error) -> bool:
    text = str(exc).lower()
    return isinstance(exc, sqlite3.DatabaseError) and any(marker in text for marker in _CORRUPTION_MARKERS)


def _floats(blob: bytes) -> list[float]:
    values = array("d")
    values.frombytes(blob)
    return values.tolist()


# ------------------------------------------------------------------------------------------------------
# The store
# ------------------------------------------------------------------------------------------------------


class TamiyoStore:
    """Every durable thing of Tamiyo, behind one lock and one SQLite connection.

    Safe to share between the service's thread and its outbox publisher thread. `verify=True` runs
    SQLite's `quick_check` on open, so a damaged file is refused before anything is read from it.
    """

    def __init__(
        self,
        path: Path,
        *,
        clock: Clock = SYSTEM_CLOCK,
        create: bool = True,
        verify: bool = True,
        busy_timeout_s: float = 5.0,
        migrations: Sequence[Migration] = MIGRATIONS,
    ) -> None:
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        existed = self.path.exists()
        if not create and not existed:
            raise StoreError(self.path, "does not exist")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db: sqlite3.Connection | None = sqlite3.connect(
                self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreError(self.path, f"cannot open: {exc}") from exc
        try:
            self._configure(verify)
            guard_sqlite_contract(self._db, f"Tamiyo store {self.path}")
            self._migrate(migrations)
            if not existed:
                self._sync_directory()
        except BaseException:
            self._db.close()
            self._db = None
            raise

    def __repr__(self) -> str:
        return f"TamiyoStore({str(self.path)!r})"

    def __enter__(self) -> TamiyoStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- plumbing -----------------------------------------------------------------------------------

    def _configure(self, verify: bool) -> None:
        db = self._connection("open")
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            db.execute("PRAGMA synchronous=FULL")
            if verify:
                problems = [row[0] for row in db.execute("PRAGMA quick_check")]
                if problems != ["ok"]:
                    raise StoreCorrupted(self.path, "; ".join(problems[:5]))
        except sqlite3.Error as exc:
            raise self._error("open", exc) from exc
        if str(mode).lower() != "wal":
            raise StoreError(self.path, f"SQLite refused WAL mode (got {mode!r}); the store needs it")

    def _migrate(self, migrations: Sequence[Migration]) -> None:
        supported = migrations[-1].version if migrations else 0
        with self._transaction("read schema version") as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
                " name TEXT NOT NULL, applied_at_ns INTEGER NOT NULL)"
            )
            applied = {row[0] for row in db.execute("SELECT version FROM schema_migrations")}
        found = max(applied, default=0)
        if found > supported:
            raise StoreSchemaError(self.path, found, supported)
        for migration in migrations:
            if migration.version in applied:
                continue
            try:
                with self._transaction(f"migration {migration.version}") as db:
                    for statement in migration.statements:
                        db.execute(statement)
                    db.execute(
                        "INSERT INTO schema_migrations (version, name, applied_at_ns) VALUES (?, ?, ?)",
                        (migration.version, migration.name, self._clock.wall_ns()),
                    )
                    db.execute(f"PRAGMA user_version = {int(migration.version)}")
            except StoreWriteError as exc:
                raise StoreSchemaError(self.path, found, supported, str(exc)) from exc

    def _sync_directory(self) -> None:
        # SQLite syncs the directory when it creates the WAL, not when it creates the database file:
        # without this, a power cut right after the first run could lose the file's directory entry.
        try:
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise StoreWriteError(self.path, "sync directory", f"{type(exc).__name__}: {exc}") from exc

    def _connection(self, operation: str) -> sqlite3.Connection:
        if self._db is None:
            raise StoreClosed(self.path, operation)
        return self._db

    def _error(self, operation: str, exc: sqlite3.Error) -> StoreError:
        if _is_corruption(exc):
            return StoreCorrupted(self.path, f"{operation}: {exc}")
        return StoreWriteError(self.path, operation, f"{type(exc).__name__}: {exc}")

    @contextmanager
    def _transaction(self, operation: str) -> Iterator[sqlite3.Connection]:
        """One state change: BEGIN IMMEDIATE ... COMMIT, rolled back whole on any failure."""
        with self._lock:
            db = self._connection(operation)
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise self._error(operation, exc) from exc
            try:
                yield db
                db.execute("COMMIT")
            except BaseException as exc:
                if db.in_transaction:
                    # The original error below is the one to report; SQLite undoes the rest itself.
                    with suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise self._error(operation, exc) from exc
                raise

    @contextmanager
    def _statement(self, operation: str) -> Iterator[sqlite3.Connection]:
        """A state change that is one SQL statement: SQLite runs it as its own transaction (autocommit),
        atomic and fsynced like `_transaction`, without the BEGIN and COMMIT round trips."""
        with self._lock:
            db = self._connection(operation)
            try:
                yield db
            except sqlite3.Error as exc:
                raise self._error(operation, exc) from exc

    @contextmanager
    def _read(self, operation: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            db = self._connection(operation)
            try:
                yield db
            except sqlite3.Error as exc:
                raise self._error(operation, exc) from exc

    def close(self) -> None:
        """Checkpoint the WAL and close the connection; later calls raise `StoreClosed`."""
        with self._lock:
            if self._db is None:
                return
            # A failed checkpoint leaves the WAL, which the next open replays: nothing is lost.
            with suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()
            self._db = None

    # -- schema -------------------------------------------------------------------------------------

    def schema_version(self) -> int:
        """The highest migration applied to this database."""
        with self._read("schema version") as db:
            return int(db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0])

    def migrations_applied(self) -> list[tuple[int, str]]:
        """(version, name) of every migration applied, in order."""
        with self._read("migrations") as db:
            return [(int(v), str(n)) for v, n in db.execute("SELECT version, name FROM schema_migrations")]

    def integrity_check(self) -> list[str]:
        """SQLite's full integrity check: `["ok"]` for a sound database."""
        with self._read("integrity check") as db:
            return [str(row[0]) for row in db.execute("PRAGMA integrity_check")]

    # -- field reports ------------------------------------------------------------------------------

    def _check_report(self, report: pb.FieldReport) -> None:
        try:
            validate_field_report(report)
        except ContractViolation as exc:
            raise RecordRejected(self.path, "field report", report.report_id, exc.field, exc.reason) from exc
        if not report.report_id.startswith("fr-"):
            raise RecordRejected(self.path, "field report", report.report_id, "report_id", "must start 'fr-'")

    def _insert_report(self, db: sqlite3.Connection, report: pb.FieldReport, now_ns: int) -> None:
        try:
            db.execute(
                "INSERT INTO field_reports (report_id, command_id, training_run_id, outcome, issued_at_ns,"
                " report, next_attempt_ns, updated_at_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    report.report_id,
                    report.command_id,
                    report.training_run_id,
                    report.outcome,
                    report.issued_at.ToNanoseconds(),
                    serialize(report),
                    now_ns,
                    now_ns,
                ),
            )
        except sqlite3.IntegrityError as exc:
            raise RecordRejected(
                self.path, "field report", report.report_id, "report_id", "is already stored"
            ) from exc

    def add_field_report(self, report: pb.FieldReport) -> None:
        """Store `report` and queue it for publication, in one transaction.

        Raises `RecordRejected` for a report without `issued_at` (retention ages reports by it), without
        its ids, or with a `report_id` already used.
        """
        self._check_report(report)
        now = self._clock.wall_ns()
        with self._statement("add field report") as db:
            self._insert_report(db, report, now)

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
                "SELECT report_id, report, status, attempts, last_error FROM field_reports " + tail,
                params,
            ).fetchall()
        result = []
        for report_id, blob, status, attempts, last_error in rows:
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

    # -- decisions and observation windows ----------------------------------------------------------

    def record_decision(self, record: pb.DecisionRecord, window: ObservationWindow | None) -> None:
        """Store a decision, queue it for publication and open its window, in one transaction.

        A decision taken by another policy version than the current one extends the policy lineage in
        the same transaction.
        """
        if not record.command_id or not record.decision_id or not record.HasField("issued_at"):
            raise RecordRejected(
                self.path, "decision", record.decision_id, "command_id/decision_id/issued_at", "are required"
            )
        if window is not None and window.command_id != record.command_id:
            raise ValueError(f"window {window.command_id!r} is not the decision's ({record.command_id!r})")
        payload = serialize(record)
        now = self._clock.wall_ns()
        with self._transaction("record decision") as db:
            try:
                db.execute(
                    "INSERT INTO decisions (command_id, decision_id, training_run_id, issued_at_ns, record,"
                    " next_attempt_ns, updated_at_ns) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        record.command_id,
                        record.decision_id,
                        record.training_run_id,
                        record.issued_at.ToNanoseconds(),
                        payload,
                        now,
                        now,
                    ),
                )
            except sqlite3.IntegrityError as exc:
                raise RecordRejected(
                    self.path, "decision", record.decision_id, "command_id", "is already stored"
                ) from exc
            if window is not None:
                db.execute(
                    "INSERT INTO windows (command_id, training_run_id, start_epoch, window_epochs,"
                    " opened_at_ns, policy_version, action, command_type, slot_id, seed_id, blueprint_id,"
                    " baseline_accuracy, baseline_loss, baseline_params)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        window.command_id,
                        window.training_run_id,
                        window.start_epoch,
                        window.window_epochs,
                        window.opened_at_ns,
                        window.policy_version,
                        window.action,
                        window.command_type,
                        window.slot_id,
                        window.seed_id,
                        window.blueprint_id,
                        window.baseline_accuracy,
                        window.baseline_loss,
                        window.baseline_params,
                    ),
                )
            self._extend_lineage(db, record.policy_version, "decision", now)

    def decision(self, command_id: str) -> pb.DecisionRecord | None:
        """The decision record of `command_id`, or None."""
        with self._read("read decision") as db:
            row = db.execute("SELECT record FROM decisions WHERE command_id = ?", (command_id,)).fetchone()
        return None if row is None else self.parse_stored(pb.DecisionRecord, row[0], f"decision {command_id}")

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
                f"SELECT {self._WINDOW_COLUMNS} FROM windows {where} ORDER BY opened_at_ns, command_id",
                params,
            ).fetchall()
        return [ObservationWindow(*row) for row in rows]

    def due_windows(self, training_run_id: str, epoch: int) -> list[ObservationWindow]:
        """Open windows of `training_run_id` that a packet at `epoch` closes."""
        with self._read("read due windows") as db:
            rows = db.execute(
                f"SELECT {self._WINDOW_COLUMNS} FROM windows WHERE training_run_id = ? AND start_epoch <= ?"
                " AND start_epoch + window_epochs <= ? ORDER BY opened_at_ns, command_id",
                (training_run_id, epoch, epoch),
            ).fetchall()
        return [ObservationWindow(*row) for row in rows]

    def close_window(self, command_id: str, report: pb.FieldReport) -> None:
        """Write the window's report, queue it and forget the window, in one transaction."""
        self._check_report(report)
        if report.command_id != command_id:
            raise RecordRejected(
                self.path, "field report", report.report_id, "command_id", f"is not {command_id!r}"
            )
        now = self._clock.wall_ns()
        with self._transaction("close window") as db:
            gone = db.execute("DELETE FROM windows WHERE command_id = ?", (command_id,)).rowcount
            if gone != 1:
                raise WindowNotOpen(self.path, command_id)
            self._insert_report(db, report, now)

    def abandon_after(self, training_run_id: str, step: int) -> AbandonResult:
        """Cut the run's timeline back to a restored checkpoint at `step`, in one transaction.

        Decisions of `training_run_id` taken after `step` (by their packet's global step) belong to a
        timeline a resumed run replaces: their windows are forgotten, and they and their field reports,
        where still pending, become `dropped` with an `abandoned` reason (never published, so never
        learned from). What the outbox had already published before the crash cannot be recalled: it is
        counted, so the caller can announce it.
        """
        reason = f"abandoned: decided after step {step}, past the checkpoint the run resumed from"
        now = self._clock.wall_ns()
        result = AbandonResult()
        with self._transaction("abandon timeline") as db:
            rows = db.execute(
                "SELECT command_id, record, status FROM decisions WHERE training_run_id = ?",
                (training_run_id,),
            ).fetchall()
            for command_id, blob, status in rows:
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
        return result

    # -- outbox -------------------------------------------------------------------------------------

    def due_outbox(self, now_ns: int, limit: int = 256) -> list[OutboxEntry]:
        """Pending reports and decisions whose next attempt is due, oldest first."""
        where = "status = 'pending' AND next_attempt_ns <= ?"
        with self._read("read outbox") as db:
            rows = db.execute(
                _OUTBOX_SELECT.format(where=where) + " ORDER BY 7 LIMIT ?", (now_ns, now_ns, limit)
            ).fetchall()
        return [OutboxEntry(*row) for row in rows]

    def outbox_entries(self, status: OutboxStatus | None = None) -> list[OutboxEntry]:
        """Every outbox entry (optionally of one status): field reports, then decisions."""
        where, params = ("status = ?", (status, status)) if status else ("1", ())
        with self._read("read outbox") as db:
            rows = db.execute(_OUTBOX_SELECT.format(where=where), params).fetchall()
        return [OutboxEntry(*row) for row in rows]

    def next_outbox_due_ns(self) -> int | None:
        """When the earliest pending entry is due, or None when nothing is pending."""
        with self._read("read outbox") as db:
            row = db.execute(
                "SELECT MIN(due) FROM (SELECT MIN(next_attempt_ns) AS due FROM field_reports"
                " WHERE status = 'pending' UNION ALL SELECT MIN(next_attempt_ns) FROM decisions"
                " WHERE status = 'pending')"
            ).fetchone()
        return None if row[0] is None else int(row[0])

    def pending_count(self, kind: OutboxKind = "field_report") -> int:
        """Entries of `kind` waiting for publication (read from the pending index: cheap)."""
        table, _ = _OUTBOX_TABLES[kind]
        with self._read("count pending") as db:
            return int(db.execute(f"SELECT COUNT(*) FROM {table} WHERE status = 'pending'").fetchone()[0])

    def outbox_counts(self, kind: OutboxKind = "field_report") -> dict[OutboxStatus, int]:
        """Entries of `kind` per status (a full scan: for reports and tests, not the hot path)."""
        table, _ = _OUTBOX_TABLES[kind]
        with self._read("count outbox") as db:
            counts = dict(db.execute(f"SELECT status, COUNT(*) FROM {table} GROUP BY status").fetchall())
        return {status: int(counts.get(status, 0)) for status in OUTBOX_STATUSES}

    @staticmethod
    def _entry_key(entry: OutboxEntry) -> tuple[str, str, str]:
        table, column = _OUTBOX_TABLES[entry.kind]
        return table, column, entry.ref_id if entry.kind == "field_report" else entry.command_id

    def mark_published(self, entries: Sequence[OutboxEntry]) -> None:
        """Entries delivered to the bus (one transaction for the batch)."""
        now = self._clock.wall_ns()
        with self._transaction("mark published") as db:
            for entry in entries:
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
            db.execute(
                f"UPDATE {table} SET status = 'dropped', attempts = ?, last_error = ?, updated_at_ns = ?"
                f" WHERE {column} = ? AND status = 'pending'",
                (attempts, error, self._clock.wall_ns(), key),
            )

    # -- category registries ------------------------------------------------------------------------

    def register(self, registry: str, keys: Sequence[str]) -> dict[str, int]:
        """Indices of `keys` in `registry`, assigning the next free index to new keys (durably)."""
        with self._transaction(f"register {registry}") as db:
            known = dict(db.execute("SELECT key, idx FROM registries WHERE registry = ?", (registry,)))
            next_index = max(known.values(), default=-1) + 1
            for key in keys:
                if not key:
                    raise RecordRejected(self.path, "registry entry", registry, "key", "is empty")
                if key not in known:
                    db.execute(
                        "INSERT INTO registries (registry, key, idx) VALUES (?, ?, ?)",
                        (registry, key, next_index),
                    )
                    known[key] = next_index
                    next_index += 1
        return {key: int(known[key]) for key in keys}

    def registry(self, registry: str) -> dict[str, int]:
        """Every key of `registry` with its index."""
        with self._read("read registry") as db:
            rows = db.execute("SELECT key, idx FROM registries WHERE registry = ? ORDER BY idx", (registry,))
            return {str(key): int(idx) for key, idx in rows}

    def registry_digest(self) -> str:
        """SHA-256 over every registry's (name, key, index): a policy is compatible only with the same."""
        digest = hashlib.sha256()
        with self._read("read registries") as db:
            for registry, key, idx in db.execute(
                "SELECT registry, key, idx FROM registries ORDER BY registry, idx"
            ):
                digest.update(f"{registry}\x1f{key}\x1f{idx}\x1e".encode())
        return digest.hexdigest()

    # -- normaliser statistics ----------------------------------------------------------------------

    def normalizer_store(self, name: str = "graph") -> NormalizerTable:
        """The `NormalizerStore` of the graph builder, kept in this database under `name`."""
        return NormalizerTable(self, name)

    def load_normalizer(self, name: str) -> dict[str, NormalizerState] | None:
        """The saved statistics per node type, or None when none were saved under `name`."""
        with self._read("read normaliser statistics") as db:
            rows = db.execute(
                "SELECT node_type, count, mean, m2 FROM normalizer WHERE name = ?", (name,)
            ).fetchall()
        if not rows:
            return None
        return {
            str(node_type): NormalizerState(_floats(count), _floats(mean), _floats(m2))
            for node_type, count, mean, m2 in rows
        }

    def save_normalizer(self, name: str, states: dict[str, NormalizerState]) -> None:
        """Replace the statistics saved under `name`, in one transaction."""
        rows = [
            (
                name,
                node_type,
                array("d", s.count).tobytes(),
                array("d", s.mean).tobytes(),
                array("d", s.m2).tobytes(),
            )
            for node_type, s in states.items()
        ]
        with self._transaction("save normaliser statistics") as db:
            db.execute("DELETE FROM normalizer WHERE name = ?", (name,))
            db.executemany(
                "INSERT INTO normalizer (name, node_type, count, mean, m2) VALUES (?, ?, ?, ?, ?)", rows
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

    # -- retention ----------------------------------------------------------------------------------

    def apply_retention(self, retention_days: float, now_ns: int | None = None) -> RetentionResult:
        """Delete reports and decisions issued more than `retention_days` ago, in one transaction.

        A report or decision still pending publication is kept (it has not reached anyone yet), and so is a
        decision whose window is still open.
        """
        if retention_days <= 0:
            raise ValueError(f"retention_days must be > 0, got {retention_days}")
        now = self._clock.wall_ns() if now_ns is None else now_ns
        cutoff = now - int(retention_days * _NS_PER_DAY)
        with self._transaction("apply retention") as db:
            kept = int(
                db.execute(
                    "SELECT COUNT(*) FROM field_reports WHERE issued_at_ns < ? AND status = 'pending'",
                    (cutoff,),
                ).fetchone()[0]
            )
            reports = db.execute(
                "DELETE FROM field_reports WHERE issued_at_ns < ? AND status != 'pending'", (cutoff,)
            ).rowcount
            decisions = db.execute(
                "DELETE FROM decisions WHERE issued_at_ns < ? AND status != 'pending' AND NOT EXISTS"
                " (SELECT 1 FROM windows WHERE windows.command_id = decisions.command_id)",
                (cutoff,),
            ).rowcount
        return RetentionResult(field_reports=reports, decisions=decisions, kept_pending=kept)


class NormalizerTable:
    """The graph builder's `NormalizerStore`, kept in a `TamiyoStore` (no file of its own)."""

    def __init__(self, store: TamiyoStore, name: str) -> None:
        self._store = store
        self.name = name

    def load(self) -> dict[str, NormalizerState] | None:
        """The saved statistics, or None when nothing was saved yet."""
        return self._store.load_normalizer(self.name)

    def save(self, states: dict[str, NormalizerState]) -> None:
        """Persist the statistics (a failure raises `StoreError`)."""
        self._store.save_normalizer(self.name, states)
