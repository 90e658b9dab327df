"""The store's connection: open and verify the file, migrate it, and run one transaction at a time.

Every group of records (`field_report_rows`, `decision_rows`, `outbox_rows`) extends it; `TamiyoStore`
is all of them over one connection.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Self

from esper.leyline import (
    SYSTEM_CLOCK,
    Clock,
    EventSink,
)
from esper.leyline import sqlite as sqlite_files
from esper.leyline.sqlite import Migration
from esper.tamiyo.records.errors import (
    StoreClosed,
    StoreCorrupted,
    StoreError,
    StoreRecordsLost,
    StoreSchemaError,
    StoreWriteError,
)
from esper.tamiyo.records.schema import MIGRATIONS, record_checksum
from esper.tamiyo.records.wal import WriteMark

_log = logging.getLogger("esper.tamiyo.store")


class StoreConnection:
    """One SQLite connection behind one lock: transactions, migrations, corruption and event reporting."""

    def __init__(
        self,
        path: Path,
        *,
        clock: Clock = SYSTEM_CLOCK,
        create: bool = True,
        verify: bool = True,
        busy_timeout_s: float = 5.0,
        migrations: Sequence[Migration] = MIGRATIONS,
        events: EventSink | None = None,
        accept_loss: bool = False,
    ) -> None:
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        self._events = events
        self._corrupt_seen: set[tuple[str, str]] = set()
        self._mark: WriteMark | None = None
        existed = self.path.exists()
        if not create and not existed:
            raise StoreError(self.path, "does not exist")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db: sqlite3.Connection | None = None
        try:
            self._mark = WriteMark(self.path)
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
            self._db = sqlite_files.connect(self.path, timeout_s=busy_timeout_s)
        except sqlite3.Error as exc:
            self._mark.close()
            raise StoreError(self.path, f"cannot open: {exc}") from exc
        try:
            self._db.create_function("esper_checksum", -1, record_checksum, deterministic=True)
            self._configure(verify)
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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- plumbing -----------------------------------------------------------------------------------

    def _configure(self, verify: bool) -> None:
        db = self._connection("open")
        try:
            if verify:
                problems = [row[0] for row in db.execute("PRAGMA quick_check")]
                if problems != ["ok"]:
                    raise StoreCorrupted(self.path, "; ".join(problems[:5]))
            sqlite_files.configure(db, self.path, f"Tamiyo store {self.path}")
        except sqlite3.Error as exc:
            raise self._error("open", exc) from exc
        except sqlite_files.WalRefused as exc:
            raise StoreError(self.path, str(exc)) from exc

    def emit_to(self, events: EventSink) -> None:
        """Send this store's events to `events` from now on (a service's telemetry)."""
        self._events = events

    def _emit(self, name: str, description: str, **attributes: str) -> None:
        attributes = {"path": str(self.path), **attributes}
        if self._events is None:
            _log.error("%s: %s %s", name, description, attributes)
        else:
            self._events(name, description, **attributes)

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
        try:
            sqlite_files.migrate(self._transaction, migrations, now_ns=self._clock.wall_ns)
        except sqlite_files.MigrationError as exc:
            if exc.cause is not None and not isinstance(exc.cause, StoreWriteError):
                raise exc.cause from exc  # a damaged file, say: reported as what it is
            detail = "" if exc.cause is None else str(exc.cause)
            raise StoreSchemaError(self.path, exc.found, exc.supported, detail) from exc

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
        if sqlite_files.is_corruption(exc):
            return StoreCorrupted(self.path, f"{operation}: {exc}")
        return StoreWriteError(self.path, operation, f"{type(exc).__name__}: {exc}")

    @contextmanager
    def _transaction(self, operation: str) -> Iterator[sqlite3.Connection]:
        """One state change: BEGIN IMMEDIATE ... COMMIT, rolled back whole on any failure."""
        with (
            self._lock,
            sqlite_files.transaction(
                self._connection(operation), operation, self._error, on_commit=self._advance_mark
            ) as db,
        ):
            yield db

    @contextmanager
    def _statement(self, operation: str) -> Iterator[sqlite3.Connection]:
        """A state change that is one SQL statement: SQLite runs it as its own transaction (autocommit),
        atomic and fsynced like `_transaction`, without the BEGIN and COMMIT round trips."""
        with self._read(operation) as db:
            yield db
            self._advance_mark()  # still under the lock, once the statement succeeded

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
