"""TamiyoStore: the one owner of Tamiyo's durable state, in one SQLite file.

Decision records, field reports, open observation windows, the outbox, normaliser statistics and the
policy lineage live in one database (`tamiyo.sqlite3` in a run directory): WAL journal,
`synchronous=FULL`, one `BEGIN IMMEDIATE` transaction per state change. A call that returned has been
committed and fsynced, so a crash at any later instant keeps it.

Damage is detected, never silent. Every record (decision, field report, window) carries a CRC32 over its
payload and key columns, checked on every read: a record that fails it is left out of what is read, with
a `tamiyo_store_record_corrupt` event, and the rest stay readable. Damage to the WAL would make SQLite's
recovery stop at the damaged frame and drop every later commit without a word; so after each commit the
store notes the WAL's committed frame count in `<db>-mark` (its high-water mark), and at open compares it
with what recovery found: acknowledged writes missing are `StoreRecordsLost`. The mark is written after the
commit's fsync and only ever lags the database, so a crash never raises a false alarm.

Records of a training run leave through the outbox only once a durable checkpoint covers them: each
decision and field report keeps the training step it was written as of, each run a release horizon (the
step of its newest durable checkpoint, `release_through`), and the outbox takes what the horizon covers.
A run killed after its checkpoint has published nothing of the steps its resume decides again
(`abandon_after` drops them).

The schema is versioned: `schema_migrations` lists every migration applied, in order, and opening an older
database applies the missing ones; a database written by a newer Esper is refused. A damaged file, a
failed write, or a record that breaks its contract (a field report without `issued_at`) is a typed error
naming the file and the cause; nothing is dropped quietly.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import struct
import threading
import zlib
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar, cast

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
from esper.tamiyo.model.normalizer_state import NormalizerState

OutboxStatus = Literal["pending", "published", "dropped"]
OutboxKind = Literal["field_report", "decision"]
OUTBOX_STATUSES: tuple[OutboxStatus, ...] = ("pending", "published", "dropped")
STREAM_OF_KIND: dict[OutboxKind, str] = {"field_report": Streams.FIELD_REPORTS, "decision": Streams.DECISIONS}
_NS_PER_DAY = 86_400 * 1_000_000_000
M = TypeVar("M", bound=Message)
StoreEventSink = Callable[[str, str, Mapping[str, str]], None]
_log = logging.getLogger("esper.tamiyo.records.store")


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


class StoreRecordsLost(StoreCorrupted):
    """Acknowledged writes are missing: the WAL was damaged after they committed (see `<db>-mark`).

    `lost` counts the acknowledged writes (transactions) gone. The store is not opened; open it with
    `accept_loss=True` to carry on without them (an event says so), or restore the file from a copy.
    """

    def __init__(self, path: Path, lost: int, detail: str) -> None:
        self.lost = lost
        super().__init__(
            path,
            f"{lost} acknowledged write(s) lost to WAL damage ({detail}); restore from a copy, or open with"
            " accept_loss=True to carry on without them",
        )


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
    """What `abandon_after` cut back: decisions past the checkpoint, reports still pending written past it
    (now dropped), entries the outbox had published before the crash (none, when the run held its records
    until a checkpoint covered them: see `release_through`), and windows reopened (their report dropped)."""

    decisions: int = 0
    field_reports: int = 0
    already_published: int = 0
    windows_reopened: int = 0


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
# The eight fields of an `OutboxEntry`, then what its checksum covers besides them.
_OUTBOX_SELECT = (
    "SELECT 'field_report', report_id, command_id, report, status, attempts, next_attempt_ns, last_error,"
    " training_run_id, issued_at_ns, outcome, checksum FROM field_reports WHERE {where} UNION ALL"
    " SELECT 'decision', decision_id, command_id, record, status, attempts, next_attempt_ns, last_error,"
    " training_run_id, issued_at_ns, NULL, checksum FROM decisions WHERE {where}"
)

# An entry may leave once its run's release horizon (the step of its newest durable checkpoint) covers
# the step it was written as of. Without a horizon the bound (the parameter) decides: everything leaves
# (`_RELEASE_ALL`), or nothing until the run's first checkpoint (`_HOLD_ALL`). Entries written as of no
# step (NULL) are never held. The subquery's bare `training_run_id` is the outer table's column.
_RELEASED = (
    "(as_of_step IS NULL OR as_of_step <= COALESCE((SELECT step FROM release_horizons"
    " WHERE run_id = training_run_id), ?))"
)
_RELEASE_ALL, _HOLD_ALL = 2**63 - 1, -1
_SET_HORIZON = (
    "INSERT INTO release_horizons (run_id, step, updated_at_ns) VALUES (?, ?, ?)"
    " ON CONFLICT (run_id) DO UPDATE SET step = {step}, updated_at_ns = excluded.updated_at_ns"
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
MIGRATIONS += (
    Migration(
        3,
        "record checksums; the unused category registries dropped",
        (
            # Existing rows get the checksum of what they hold now (`esper_checksum` is `_checksum`).
            "ALTER TABLE field_reports ADD COLUMN checksum INTEGER NOT NULL DEFAULT 0",
            "UPDATE field_reports SET checksum = esper_checksum(report, report_id, command_id,"
            " training_run_id, outcome, issued_at_ns)",
            "ALTER TABLE decisions ADD COLUMN checksum INTEGER NOT NULL DEFAULT 0",
            "UPDATE decisions SET checksum = esper_checksum(record, command_id, decision_id,"
            " training_run_id, issued_at_ns)",
            "ALTER TABLE windows ADD COLUMN checksum INTEGER NOT NULL DEFAULT 0",
            "UPDATE windows SET checksum = esper_checksum(X'', command_id, training_run_id, start_epoch,"
            " window_epochs, opened_at_ns, policy_version, action, command_type, slot_id, seed_id,"
            " blueprint_id, baseline_accuracy, baseline_loss, baseline_params)",
            # Category indices are fixed in code and digested into the policy's registry digest
            # (`tamiyo.updates.policy_registry_digest`); nothing ever wrote this table.
            "DROP TABLE registries",
        ),
    ),
    Migration(
        4,
        "release horizons: records wait for the checkpoint that covers their training step",
        (
            # The training step a record was written as of (NULL: written before this, or outside a run:
            # never held). Not under the checksum: it only decides when a record may leave.
            "ALTER TABLE decisions ADD COLUMN as_of_step INTEGER",
            "ALTER TABLE field_reports ADD COLUMN as_of_step INTEGER",
            # `run_id`, not `training_run_id`: the outbox's subquery names the outer table's column bare.
            "CREATE TABLE release_horizons (run_id TEXT PRIMARY KEY, step INTEGER NOT NULL,"
            " updated_at_ns INTEGER NOT NULL)",
            # A window closed into a report that is still pending, kept so that a resume to a step before
            # the report can reopen it (the report is dropped; the resumed run closes the window again).
            "CREATE TABLE closed_windows (command_id TEXT PRIMARY KEY, training_run_id TEXT NOT NULL,"
            " start_epoch INTEGER NOT NULL, window_epochs INTEGER NOT NULL, opened_at_ns INTEGER NOT NULL,"
            " policy_version TEXT NOT NULL, action INTEGER NOT NULL, command_type INTEGER NOT NULL,"
            " slot_id TEXT NOT NULL, seed_id TEXT NOT NULL, blueprint_id TEXT NOT NULL,"
            " baseline_accuracy REAL NOT NULL, baseline_loss REAL NOT NULL, baseline_params REAL,"
            " checksum INTEGER NOT NULL, report_id TEXT NOT NULL UNIQUE, as_of_step INTEGER NOT NULL)",
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
# Record checksums
# ------------------------------------------------------------------------------------------------------


def _checksum(blob: bytes, *keys: object) -> int:
    """CRC32 over a record's key columns and payload, as they read back from SQLite.

    Callers pass each value with the type its column returns (`int` for INTEGER, `float` for REAL, `str`
    for TEXT, None for NULL), so the checksum of a written row equals the one computed on reading it.
    CRC32 catches every single-bit flip and every burst up to 32 bits; this guards against damage, not
    against someone who rewrites rows on purpose.
    """
    return zlib.crc32(blob, zlib.crc32("\x1f".join([str(key) for key in keys]).encode()))


def _window_checksum(row: Sequence[object]) -> int:
    return _checksum(b"", *row)


# ------------------------------------------------------------------------------------------------------
# The acknowledged-write mark
# ------------------------------------------------------------------------------------------------------

# WAL file header (https://sqlite.org/fileformat2.html#walformat): magic, version, page size, checkpoint
# sequence, salt-1, salt-2, checksum-1, checksum-2, all big-endian; each frame has a 24-byte header
# (page number, size of the database after a commit frame or 0, salts, checksums) and one page.
_WAL_HEADER = struct.Struct(">IIIIII")
_WAL_MAGIC_LE, _WAL_MAGIC_BE = 0x377F0682, 0x377F0683
_FRAME_HEADER = 24
# WAL-index header, the first 48 bytes of `-shm` (fileformat2, "WAL-index format"): version 3007000,
# isInit at 12, mxFrame (the last valid commit frame) at 16, the WAL's salts at 32, native byte order.
_SHM_VERSION_BYTES = struct.pack("=I", 3007000)
_SHM_U32 = struct.Struct("=I")
_MARK = struct.Struct(">8sII")  # salts, committed frames, CRC32 of the first 12 bytes
_MARK_BODY, _MARK_CRC = struct.Struct(">8sI"), struct.Struct(">I")


def _wal_header_valid(header: bytes) -> bool:
    magic = int.from_bytes(header[:4], "big")
    if magic not in (_WAL_MAGIC_LE, _WAL_MAGIC_BE):
        return False
    words = struct.unpack((">" if magic == _WAL_MAGIC_BE else "<") + "6I", header[:24])
    s0 = s1 = 0
    for index in range(0, 6, 2):
        s0 = (s0 + words[index] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[index + 1] + s0) & 0xFFFFFFFF
    return header[24:32] == struct.pack(">II", s0, s1)


class _WriteMark:
    """`<db>-mark`: the WAL generation (its salts) and its committed frame count after our last commit.

    Written with `pwrite` after the commit's fsync, never fsynced itself: a process crash keeps it (page
    cache), a power cut may lose its last update, and either way it can only lag the WAL, never lead it.
    """

    def __init__(self, db_path: Path) -> None:
        self.path = Path(f"{db_path}-mark")
        self.wal = Path(f"{db_path}-wal")
        self._shm = Path(f"{db_path}-shm")
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self._shm_fd: int | None = None

    def close(self) -> None:
        self.forget_wal_index()
        with suppress(OSError):
            os.close(self._fd)

    def forget_wal_index(self) -> None:
        """Reopen `-shm` on next use (it is recreated when the last connection to the database closes)."""
        if self._shm_fd is not None:
            with suppress(OSError):
                os.close(self._shm_fd)
            self._shm_fd = None

    def read(self) -> tuple[bytes, int] | None:
        """The last mark written, or None (none yet, or unreadable: then there is nothing to compare)."""
        data = os.pread(self._fd, _MARK.size, 0)
        if len(data) != _MARK.size:
            return None
        salts, frames, crc = _MARK.unpack(data)
        return (salts, frames) if zlib.crc32(data[:12]) == crc else None

    def committed(self) -> tuple[bytes, int] | None:
        """(salts, mxFrame) of the WAL-index header: what SQLite holds as committed right now."""
        if self._shm_fd is None:
            try:
                self._shm_fd = os.open(self._shm, os.O_RDONLY)
            except FileNotFoundError:
                return None
        head = os.pread(self._shm_fd, 48, 0)
        if head[:4] != _SHM_VERSION_BYTES or len(head) < 48 or not head[12]:
            return None
        return head[32:40], _SHM_U32.unpack_from(head, 16)[0]

    def advance(self) -> None:
        """Note the WAL's committed frames (called after each commit, under the store's lock)."""
        state = self.committed()
        if state is not None:
            body = _MARK_BODY.pack(*state)
            os.pwrite(self._fd, body + _MARK_CRC.pack(zlib.crc32(body)), 0)

    def lost(self) -> tuple[int, str] | None:
        """Acknowledged commits that recovery did not find, with what was seen; None when none are missing.

        Called at open inside a read transaction (no writer can restart the WAL meanwhile), after SQLite's
        recovery and before anything is written (a write would overwrite the damaged tail).
        """
        mark = self.read()
        if mark is None or not self.wal.exists():
            return None
        salts, acknowledged = mark
        with self.wal.open("rb") as wal:
            header = wal.read(32)
            if len(header) < 32:
                return None  # truncated by a checkpoint: every frame is in the database
            if not _wal_header_valid(header):
                return max(acknowledged, 1), "the WAL header fails its checksum: SQLite ignores the whole WAL"
            if header[16:24] != salts:
                return None  # the WAL restarted after a complete checkpoint: the marked frames are in the db
            state = self.committed()
            if state is None or state[0] != salts or state[1] >= acknowledged:
                return None
            recovered = state[1]
            page = _WAL_HEADER.unpack(header[:24])[2]
            commits = 0
            for frame in range(recovered + 1, acknowledged + 1):
                wal.seek(32 + (frame - 1) * (_FRAME_HEADER + page))
                frame_header = wal.read(8)
                commits += len(frame_header) == 8 and frame_header[4:8] != b"\0\0\0\0"
        detail = f"frames {recovered + 1}-{acknowledged} of the WAL were committed and are not valid now"
        return max(commits, 1), detail


# ------------------------------------------------------------------------------------------------------
# The store
# ------------------------------------------------------------------------------------------------------


class TamiyoStore:
    """Every durable thing of Tamiyo, behind one lock and one SQLite connection.

    Safe to share between the service's thread and its outbox publisher thread. `verify=True` runs
    SQLite's `quick_check` on open, so a damaged file is refused before anything is read from it.
    Acknowledged writes lost to WAL damage are `StoreRecordsLost` at open, unless `accept_loss` (then a
    `tamiyo_store_records_lost` event). `events` receives the store's events (name, description,
    attributes); without it they are logged.
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
        events: StoreEventSink | None = None,
        accept_loss: bool = False,
    ) -> None:
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        self._events = events
        self._corrupt_seen: set[tuple[str, str]] = set()
        self._mark: _WriteMark | None = None
        existed = self.path.exists()
        if not create and not existed:
            raise StoreError(self.path, "does not exist")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db: sqlite3.Connection | None = None
        try:
            self._mark = _WriteMark(self.path)
        except OSError as exc:
            raise StoreWriteError(self.path, "open the write mark", f"{type(exc).__name__}: {exc}") from exc
        try:
            lost = self._find_lost_writes(busy_timeout_s) if existed else None
            if lost is not None and not accept_loss:
                raise StoreRecordsLost(self.path, *lost)
        except BaseException:
            self._mark.close()
            raise
        try:
            self._db = sqlite3.connect(
                self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            self._mark.close()
            raise StoreError(self.path, f"cannot open: {exc}") from exc
        try:
            self._db.create_function("esper_checksum", -1, _checksum, deterministic=True)
            self._configure(verify)
            guard_sqlite_contract(self._db, f"Tamiyo store {self.path}")
            if lost is not None:
                self._accept_loss(*lost)
            self._migrate(migrations)
            if not existed:
                self._sync_directory()
        except BaseException:
            self._db.close()
            self._db = None
            if self._mark is not None:
                self._mark.close()
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

    def emit_to(self, events: StoreEventSink) -> None:
        """Send this store's events to `events` from now on (a service's telemetry)."""
        self._events = events

    def _emit(self, name: str, description: str, **attributes: str) -> None:
        attributes = {"path": str(self.path), **attributes}
        if self._events is None:
            _log.error("%s: %s %s", name, description, attributes)
        else:
            self._events(name, description, attributes)

    def _find_lost_writes(self, busy_timeout_s: float) -> tuple[int, str] | None:
        """Compare the acknowledged-write mark with what SQLite's recovery finds in the WAL.

        Runs on a read-only connection before the store's own: a read-only connection never checkpoints
        (a checkpoint, or any write, would overwrite the damaged tail), so a refused open leaves the
        evidence for the next one. Inside its read transaction no writer can restart the WAL.
        """
        assert self._mark is not None
        if not self._mark.wal.exists():
            return None
        try:
            db = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode=ro",
                uri=True,
                timeout=busy_timeout_s,
                isolation_level=None,
            )
        except sqlite3.Error as exc:
            raise StoreError(self.path, f"cannot open: {exc}") from exc
        try:
            db.execute("BEGIN")
            db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # the read starts: recovery ran
            return self._mark.lost()
        except sqlite3.Error as exc:
            raise self._error("open", exc) from exc
        except OSError as exc:
            raise StoreError(self.path, f"cannot read the WAL to check it: {exc}") from exc
        finally:
            db.close()
            self._mark.forget_wal_index()

    def _accept_loss(self, lost: int, detail: str) -> None:
        self._emit(
            "tamiyo_store_records_lost",
            f"{lost} acknowledged write(s) lost to WAL damage ({detail}); carrying on without them",
            lost=str(lost),
        )
        try:  # what recovery kept is the store now: the damaged tail is checkpointed away, the mark reset
            self._connection("open").execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            raise self._error("checkpoint after accepted loss", exc) from exc
        self._advance_mark()

    def _advance_mark(self) -> None:
        if self._mark is None:
            return
        try:
            self._mark.advance()
        except OSError as exc:  # the write itself is committed: announce that loss detection is off
            self._mark.close()
            self._mark = None
            self._emit(
                "tamiyo_store_mark_failed",
                f"the acknowledged-write mark cannot be written ({exc}); WAL damage will go undetected",
            )

    def _corrupt(self, kind: str, key: str) -> None:
        """A record failed its checksum: left out of what is read, with one event per record."""
        if (kind, key) in self._corrupt_seen:
            return
        self._corrupt_seen.add((kind, key))
        self._emit(
            "tamiyo_store_record_corrupt",
            f"{kind} {key!r} fails its checksum and is left out; the other records stay readable",
            kind=kind,
            key=key,
        )

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
                self._advance_mark()
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
            self._advance_mark()

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
            if self._mark is not None:
                self._mark.close()
                self._mark = None

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
        # `_checksum` inlined (the hot path): the same bytes as "\x1f".join(str(key) for key in keys).
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
            if _checksum(blob, report_id, command_id, run, outcome, issued) != checksum:
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

    # -- decisions and observation windows ----------------------------------------------------------

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
        checksum = _checksum(payload, record.command_id, record.decision_id, record.training_run_id, issued)
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
                    (*window_row, _window_checksum(window_row)),
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
        if _checksum(blob, command_id, decision_id, run, issued) != checksum:
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
            if _window_checksum(row[:-1]) != row[-1]:
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
            db.execute(_SET_HORIZON.format(step="excluded.step"), (training_run_id, int(step), now))
            rows = db.execute(
                "SELECT command_id, decision_id, issued_at_ns, record, status, checksum FROM decisions"
                " WHERE training_run_id = ?",
                (training_run_id,),
            ).fetchall()
            for command_id, decision_id, issued, blob, status, checksum in rows:
                if _checksum(blob, command_id, decision_id, training_run_id, issued) != checksum:
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

    # -- outbox -------------------------------------------------------------------------------------

    def due_outbox(self, now_ns: int, limit: int = 256, *, hold: bool = False) -> list[OutboxEntry]:
        """Pending reports and decisions whose next attempt is due and that their run's release horizon
        covers, oldest first. A run without a horizon has all of its entries released, or, with `hold`,
        none (until `release_through` gives it one)."""
        where = f"status = 'pending' AND next_attempt_ns <= ? AND {_RELEASED}"
        bound = _HOLD_ALL if hold else _RELEASE_ALL
        with self._read("read outbox") as db:
            rows = db.execute(
                _OUTBOX_SELECT.format(where=where) + " ORDER BY 7 LIMIT ?",
                (now_ns, bound, now_ns, bound, limit),
            ).fetchall()
        return self._verified_entries(rows)

    def outbox_entries(self, status: OutboxStatus | None = None) -> list[OutboxEntry]:
        """Every outbox entry (optionally of one status): field reports, then decisions."""
        where, params = ("status = ?", (status, status)) if status else ("1", ())
        with self._read("read outbox") as db:
            rows = db.execute(_OUTBOX_SELECT.format(where=where), params).fetchall()
        return self._verified_entries(rows)

    def _verified_entries(self, rows: Sequence[Sequence[object]]) -> list[OutboxEntry]:
        entries = []
        for row in rows:
            kind, ref_id, command_id, blob, *_, run, issued, outcome, checksum = row
            payload = cast(bytes, blob)
            if kind == "field_report":
                expected = _checksum(payload, ref_id, command_id, run, outcome, issued)
            else:
                expected = _checksum(payload, command_id, ref_id, run, issued)
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
        bound = _HOLD_ALL if hold else _RELEASE_ALL
        with self._read("read outbox") as db:
            row = db.execute(
                "SELECT MIN(due) FROM (SELECT MIN(next_attempt_ns) AS due FROM field_reports"
                f" WHERE status = 'pending' AND {_RELEASED} UNION ALL SELECT MIN(next_attempt_ns)"
                f" FROM decisions WHERE status = 'pending' AND {_RELEASED})",
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
                _SET_HORIZON.format(step="MAX(step, excluded.step)"),
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
                _SET_HORIZON.format(step="MAX(step, excluded.step)"),
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
