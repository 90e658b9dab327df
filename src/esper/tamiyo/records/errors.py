"""The Tamiyo store's typed errors: each names the database file and what went wrong."""

from __future__ import annotations

from pathlib import Path

from esper.leyline import (
    EsperError,
)


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
