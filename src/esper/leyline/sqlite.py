"""The SQLite plumbing every durable file of Esper shares (Tamiyo's store, the embedded bus, Urza's
catalogue): one way to open, to change state, to migrate a schema and to tell damage from failure.

- `connect`: WAL journal and `synchronous=FULL` (a call that returned survives a power cut), autocommit
  mode so that transactions are explicit, one connection shared between threads under the caller's lock,
  and the contract version recorded in (or checked against) the file.
- `transaction`: `BEGIN IMMEDIATE ... COMMIT` (the write lock taken up front, so two writers never
  deadlock half-way), rolled back whole on any failure; a SQLite error leaves as the caller's typed error.
- `migrate`: numbered schema steps, each applied once in its own transaction and recorded.
- `open_store`: the three together (connect, configure, migrate), the connection closed on any failure
  and the failure turned into the caller's typed error.
- `is_corruption`: whether an error means the file itself is damaged, rather than a write that failed.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from esper.leyline.errors import EsperError
from esper.leyline.wire import guard_sqlite_contract

ErrorMapper = Callable[[str, sqlite3.Error], Exception]
"""Turns a SQLite error during `operation` into the caller's typed error (corruption told apart)."""

# sqlite3 messages that mean the file itself is damaged (as opposed to a failed write).
_CORRUPTION_MARKERS = ("malformed", "not a database", "file is encrypted", "corrupt")


class WalRefused(EsperError):
    """SQLite would not put the file in WAL mode (a file system without shared memory, say)."""

    def __init__(self, path: Path, mode: str) -> None:
        self.path = path
        self.mode = mode
        super().__init__(f"{path}: SQLite refused WAL mode (got {mode!r}); it is needed for durability")


def is_corruption(exc: sqlite3.Error) -> bool:
    """True when `exc` says the database file is damaged (not a busy lock or a failed write)."""
    text = str(exc).lower()
    return isinstance(exc, sqlite3.DatabaseError) and any(marker in text for marker in _CORRUPTION_MARKERS)


def connect(path: Path, *, timeout_s: float) -> sqlite3.Connection:
    """Open `path` in autocommit mode, shareable between threads (the caller serialises access), waiting
    up to `timeout_s` for another process's lock. Raises `sqlite3.Error`; `configure` comes next."""
    return sqlite3.connect(path, timeout=timeout_s, isolation_level=None, check_same_thread=False)


def configure(db: sqlite3.Connection, path: Path, where: str) -> None:
    """WAL and `synchronous=FULL`, then the contract version (`where` names the file in its error).

    Raises `WalRefused`, `ContractVersionMismatch` or `sqlite3.Error`."""
    mode = str(db.execute("PRAGMA journal_mode=WAL").fetchone()[0])
    db.execute("PRAGMA synchronous=FULL")
    if mode.lower() != "wal":
        raise WalRefused(path, mode)
    guard_sqlite_contract(db, where)


@contextmanager
def transaction(
    db: sqlite3.Connection,
    operation: str,
    error: ErrorMapper,
    *,
    on_commit: Callable[[], None] | None = None,
) -> Iterator[sqlite3.Connection]:
    """One state change: `BEGIN IMMEDIATE`, the block, `COMMIT` (then `on_commit`); on any failure the
    whole change is rolled back, and a SQLite error leaves as `error(operation, exc)`."""
    try:
        db.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        raise error(operation, exc) from exc
    try:
        yield db
        db.execute("COMMIT")
    except BaseException as exc:
        if db.in_transaction:
            # The original error below is the one to report; SQLite undoes the rest itself.
            with suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise error(operation, exc) from exc
        raise
    if on_commit is not None:
        on_commit()


@dataclass(frozen=True)
class Migration:
    """One step of a schema, applied once, in its own transaction."""

    version: int
    name: str
    statements: tuple[str, ...]


class MigrationError(EsperError):
    """The schema cannot be brought up to date: the file is ahead of this code (`cause` None), or a step
    failed (`cause` is the step's error; the step was rolled back, the earlier ones stay)."""

    def __init__(self, found: int, supported: int, cause: Exception | None = None) -> None:
        self.found = found
        self.supported = supported
        self.cause = cause
        what = "is newer than this code supports" if cause is None else f"cannot be migrated ({cause})"
        super().__init__(f"schema version {found} {what}; supported: {supported}")


def migrate(
    open_transaction: Callable[[str], AbstractContextManager[sqlite3.Connection]],
    migrations: Sequence[Migration],
    *,
    now_ns: Callable[[], int],
) -> int:
    """Apply every migration not yet recorded in `schema_migrations`, oldest first, each in its own
    transaction (`open_transaction(operation)`, e.g. a `transaction` bound to the file), and return the
    version found before.

    Raises `MigrationError` when the file is ahead of `migrations` (nothing is applied then) or a step
    fails; an error reading the recorded versions leaves as `open_transaction` raises it."""
    supported = migrations[-1].version if migrations else 0
    with open_transaction("read schema version") as db:
        db.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
            " name TEXT NOT NULL, applied_at_ns INTEGER NOT NULL)"
        )
        applied = {row[0] for row in db.execute("SELECT version FROM schema_migrations")}
    found = max(applied, default=0)
    if found > supported:
        raise MigrationError(found, supported)
    for migration in migrations:
        if migration.version in applied:
            continue
        try:
            with open_transaction(f"migration {migration.version}") as db:
                for statement in migration.statements:
                    db.execute(statement)
                db.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at_ns) VALUES (?, ?, ?)",
                    (migration.version, migration.name, now_ns()),
                )
                db.execute(f"PRAGMA user_version = {int(migration.version)}")
        except EsperError as exc:
            raise MigrationError(found, supported, exc) from exc
    return found


def open_store(
    path: Path,
    *,
    timeout_s: float,
    where: str,
    migrations: Sequence[Migration],
    now_ns: Callable[[], int],
    error: ErrorMapper,
    refused: Callable[[WalRefused | MigrationError], Exception],
) -> sqlite3.Connection:
    """`connect`, `configure` (`where` names the file) and `migrate` `path`; the connection, ready to use.

    Each migration runs in a `transaction` whose SQLite errors leave as `error`. On any failure the
    connection is closed: a SQLite error leaves as `error("open", exc)`, a refused WAL mode or migration as
    `refused(exc)`, anything else (a `ContractVersionMismatch`, the caller's typed error) as it is."""
    try:
        db = connect(path, timeout_s=timeout_s)
    except sqlite3.Error as exc:
        raise error("open", exc) from exc
    try:
        configure(db, path, where)
        migrate(lambda operation: transaction(db, operation, error), migrations, now_ns=now_ns)
    except BaseException as exc:
        db.close()
        if isinstance(exc, sqlite3.Error):
            raise error("open", exc) from exc
        if isinstance(exc, WalRefused | MigrationError):
            raise refused(exc) from exc
        raise
    return db
