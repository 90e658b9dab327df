"""`RecordStore`: every decision record and field report Simic took off the bus, durable before it is acked.

The bus delivers at least once and forgets a message once it is acked. A learner that acked what it only
held in memory loses it when it is killed; so each drained batch is written here first (one SQLite
transaction, `synchronous=FULL`), and acked after. One row per kind and command id: a redelivered or
republished copy of a record is ignored (the first copy is kept), so every record is held, and counted,
once. On start the learner reloads what it held.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, TypeAlias

from google.protobuf.message import DecodeError

from esper.leyline import SYSTEM_CLOCK, Clock, EsperError, pb
from esper.leyline import sqlite as sqlite_files
from esper.leyline.sqlite import Migration

RecordKind = Literal["decision", "field_report"]
Record: TypeAlias = pb.DecisionRecord | pb.FieldReport

_KIND_OF: dict[type[Record], RecordKind] = {pb.DecisionRecord: "decision", pb.FieldReport: "field_report"}
_TYPE_OF: dict[str, type[Record]] = {"decision": pb.DecisionRecord, "field_report": pb.FieldReport}

MIGRATIONS = (
    Migration(
        1,
        "decision records and field reports, one per kind and command id",
        (
            "CREATE TABLE records (seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL,"
            " command_id TEXT NOT NULL, training_run_id TEXT NOT NULL, payload BLOB NOT NULL,"
            " received_at_ns INTEGER NOT NULL, UNIQUE (kind, command_id))",
        ),
    ),
)


class RecordStoreError(EsperError):
    """Simic's record store cannot be opened, read or written (the path and the cause are named)."""

    def __init__(self, path: Path, operation: str, cause: str) -> None:
        self.path = path
        self.operation = operation
        self.cause = cause
        super().__init__(f"{operation} on Simic's record store {path} failed: {cause}")


class RecordStore:
    """Decision records and field reports, one per kind and command id, in one SQLite file."""

    def __init__(self, path: Path, *, clock: Clock = SYSTEM_CLOCK, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db: sqlite3.Connection | None = sqlite_files.open_store(
            self.path,
            timeout_s=busy_timeout_s,
            where=f"Simic's record store {self.path}",
            migrations=MIGRATIONS,
            now_ns=clock.wall_ns,
            error=self._error,
            refused=lambda exc: RecordStoreError(self.path, "open", str(exc)),
        )

    def __enter__(self) -> RecordStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file (idempotent)."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def add(self, records: Sequence[Record]) -> list[Record]:
        """Keep `records` in one transaction (durable once this returns); returns those that were new,
        in order. A record whose kind and command id are held already is ignored; one without a command
        id is refused (ValueError), and nothing of the batch is kept then."""
        for record in records:
            if not record.command_id:
                raise ValueError(f"a {type(record).__name__} without a command id cannot be held")
        added: list[Record] = []
        now = self._clock.wall_ns()
        with self._transaction("add records") as db:
            for record in records:
                cursor = db.execute(
                    "INSERT OR IGNORE INTO records (kind, command_id, training_run_id, payload,"
                    " received_at_ns) VALUES (?, ?, ?, ?, ?)",
                    (
                        _KIND_OF[type(record)],
                        record.command_id,
                        record.training_run_id,
                        record.SerializeToString(deterministic=True),
                        now,
                    ),
                )
                if cursor.rowcount == 1:
                    added.append(record)
        return added

    def load(self, *, newest: int | None = None) -> list[Record]:
        """Every record held (or the `newest` of each kind), decisions first, each kind in arrival order.
        A row that does not parse as its kind is a `RecordStoreError` (the file was damaged)."""
        result: list[Record] = []
        with self._transaction("load records") as db:
            for kind in ("decision", "field_report"):
                query = "SELECT seq, command_id, payload FROM records WHERE kind = ? ORDER BY seq"
                params: tuple[object, ...] = (kind,)
                if newest is not None:
                    query = (
                        "SELECT * FROM (SELECT seq, command_id, payload FROM records WHERE kind = ?"
                        " ORDER BY seq DESC LIMIT ?) ORDER BY seq"
                    )
                    params = (kind, int(newest))
                for _seq, command_id, payload in db.execute(query, params).fetchall():
                    message = _TYPE_OF[kind]()
                    try:
                        message.ParseFromString(payload)
                    except DecodeError as exc:
                        raise RecordStoreError(
                            self.path, "load records", f"the {kind} of {command_id} does not parse: {exc}"
                        ) from exc
                    result.append(message)
        return result

    def count(self, kind: RecordKind) -> int:
        """How many records of `kind` are held (one per command id)."""
        with self._transaction("count records") as db:
            row = db.execute("SELECT COUNT(*) FROM records WHERE kind = ?", (kind,)).fetchone()
        return int(row[0])

    def command_ids(self, kind: RecordKind) -> list[str]:
        """The command ids of every record of `kind`, in arrival order."""
        with self._transaction("read command ids") as db:
            rows = db.execute(
                "SELECT command_id FROM records WHERE kind = ? ORDER BY seq", (kind,)
            ).fetchall()
        return [str(row[0]) for row in rows]

    # -- plumbing ------------------------------------------------------------------------------------

    def _error(self, operation: str, exc: sqlite3.Error) -> RecordStoreError:
        cause = f"{'the file is damaged: ' if sqlite_files.is_corruption(exc) else ''}{exc}"
        return RecordStoreError(self.path, operation, cause)

    @contextmanager
    def _transaction(self, operation: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._db is None:
                raise RecordStoreError(self.path, operation, "the store is closed")
            with sqlite_files.transaction(self._db, operation, self._error) as db:
                yield db
