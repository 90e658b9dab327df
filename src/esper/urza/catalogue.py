# Over 500 lines: one class, the catalogue's table, its migrations and its change notifications.
"""BlueprintCatalogue: the blueprint descriptors in SQLite, their factories, and change notifications.

Durability: WAL journal, `synchronous=FULL`, one transaction per change. Every change (add, update,
quarantine, unquarantine, remove, and the seeding of built-ins) bumps the catalogue's revision, stamps it
on the descriptor it touched, and writes a `pb.CatalogueChange` into the outbox table in the same
transaction. After the commit:

1. with a `ChangePublisher` (the bus), every change in the outbox is published, then deleted from the
   outbox. A publish that fails raises `NotificationFailed`; the change is committed and its notification
   stays in the outbox until the next change or `publish_pending()` (any process may flush it). A crash
   between publish and delete publishes it again: at-least-once, never lost.
2. every in-process listener is called. A listener that raises does not undo the change; the caller
   sees `ListenerFailed` naming every listener error.

Opening a catalogue publishes nothing; call `publish_pending()` to flush what an earlier process left.
"""

from __future__ import annotations

import builtins
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError
from torch import nn

from esper.leyline import (
    SYSTEM_CLOCK,
    Clock,
    EsperError,
    pb,
    serialize,
    timestamp_from_ns,
)
from esper.leyline import sqlite as sqlite_files
from esper.leyline.sqlite import Migration
from esper.urza.blueprints import (
    BUILTIN_FACTORIES,
    HOST_KINDS,
    FactoryRegistry,
    build_blueprint,
    count_built,
)
from esper.urza.errors import (
    BlueprintQuarantined,
    CatalogueCorrupt,
    CatalogueTimeout,
    DuplicateBlueprint,
    InvalidDescriptor,
    ListenerFailed,
    NotificationFailed,
    UnknownBlueprint,
)
from esper.urza.notifications import ChangePublisher

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
Listener = Callable[[pb.CatalogueChange], None]

# A catalogue written before migrations were recorded has these tables already: step 1 records them.
MIGRATIONS = (
    Migration(
        1,
        "meta, blueprints, seeded, outbox",
        (
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
            "CREATE TABLE IF NOT EXISTS blueprints (position INTEGER PRIMARY KEY AUTOINCREMENT,"
            " blueprint_id TEXT NOT NULL UNIQUE, descriptor BLOB NOT NULL, quarantine_reason TEXT)",
            "CREATE TABLE IF NOT EXISTS seeded (blueprint_id TEXT PRIMARY KEY)",
            "CREATE TABLE IF NOT EXISTS outbox (revision INTEGER PRIMARY KEY, change BLOB NOT NULL)",
        ),
    ),
)
# How long a write waits for another process's lock (sqlite3's default, made explicit).
BUSY_TIMEOUT_MS = 5_000
# VM instructions between two checks of a read's deadline.
_DEADLINE_CHECK_EVERY = 1_000


def _validate_descriptor(descriptor: pb.BlueprintDescriptor) -> None:
    blueprint_id = str(descriptor.blueprint_id)
    if not blueprint_id:
        raise InvalidDescriptor(blueprint_id, "blueprint_id", "is required and was empty")
    if not descriptor.name:
        raise InvalidDescriptor(blueprint_id, "name", "is required and was empty")
    if descriptor.tier == pb.BLUEPRINT_TIER_UNSPECIFIED:
        raise InvalidDescriptor(blueprint_id, "tier", "is required and was UNSPECIFIED")
    if not math.isfinite(descriptor.risk) or not 0.0 <= descriptor.risk <= 1.0:
        raise InvalidDescriptor(blueprint_id, "risk", f"must be in [0, 1], got {descriptor.risk}")
    kinds = list(descriptor.host_kinds)
    if not kinds or any(kind not in HOST_KINDS for kind in kinds) or len(set(kinds)) != len(kinds):
        raise InvalidDescriptor(
            blueprint_id, "host_kinds", f"must be distinct values of {list(HOST_KINDS)}, got {kinds}"
        )
    for name, bounds in descriptor.allowed_parameters.items():
        low, high = bounds.min_value, bounds.max_value
        if not (math.isfinite(low) and math.isfinite(high)) or low > high:
            raise InvalidDescriptor(
                blueprint_id, f"allowed_parameters[{name}]", f"needs finite min <= max, got [{low}, {high}]"
            )


class BlueprintCatalogue:
    """The blueprint library of one deployment: descriptors in SQLite, modules from registered factories.

    Safe to share between threads of one process (a lock serialises access to the connection), and
    between processes (SQLite's locks). With a `publisher`, committed changes are published on the bus.
    """

    def __init__(
        self,
        path: Path,
        *,
        factories: FactoryRegistry = BUILTIN_FACTORIES,
        clock: Clock = SYSTEM_CLOCK,
        publisher: ChangePublisher | None = None,
    ) -> None:
        self.path = Path(path)
        self._factories = factories
        self._clock = clock
        self._publisher = publisher
        self._listeners: builtins.list[Listener] = []
        self._lock = threading.RLock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite_files.open_store(
            self.path,
            timeout_s=BUSY_TIMEOUT_MS / 1000,
            where=f"Urza catalogue {self.path}",
            migrations=MIGRATIONS,
            now_ns=clock.wall_ns,
            error=self._error,
            refused=lambda exc: CatalogueCorrupt(self.path, str(exc)),
        )
        try:
            self._check_schema()
        except BaseException:
            self._db.close()
            raise

    @classmethod
    def open_default(
        cls,
        path: Path,
        *,
        factories: FactoryRegistry = BUILTIN_FACTORIES,
        clock: Clock = SYSTEM_CLOCK,
        publisher: ChangePublisher | None = None,
    ) -> BlueprintCatalogue:
        """Open (or create) the catalogue at `path` and add every built-in blueprint never added before.

        Idempotent: a second open changes nothing, and a built-in that was removed stays removed. The
        seeding's ADDED notifications wait in the outbox for the next change or `publish_pending()`.
        """
        catalogue = cls(path, factories=factories, clock=clock, publisher=publisher)
        catalogue._seed_builtins()
        return catalogue

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> BlueprintCatalogue:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- reading -----------------------------------------------------------------------------------

    @property
    def revision(self) -> int:
        """The catalogue's revision: the number of changes ever committed."""
        with self._lock:
            row = self._query_one("SELECT value FROM meta WHERE key = 'revision'")
        return int(row[0]) if row else 0

    def list(self) -> builtins.list[pb.BlueprintDescriptor]:
        """Every descriptor, quarantined ones included, in the order they were added."""
        with self._lock:
            rows = self._query_all("SELECT blueprint_id, descriptor FROM blueprints ORDER BY position")
        return [self._decode(str(blueprint_id), blob) for blueprint_id, blob in rows]

    def get(self, blueprint_id: str, *, timeout_ms: float | None = None) -> pb.BlueprintDescriptor:
        """The descriptor of `blueprint_id` (a copy), or `UnknownBlueprint`.

        With `timeout_ms`, the read is abandoned at the deadline (waiting for this connection, for
        another process's lock, or running the query) and `CatalogueTimeout` is raised; nothing of it
        keeps running afterwards.
        """
        sql = "SELECT descriptor FROM blueprints WHERE blueprint_id = ?"
        if timeout_ms is None:
            with self._lock:
                row = self._query_one(sql, (blueprint_id,))
        else:
            row = self._query_one_by(sql, (blueprint_id,), blueprint_id, timeout_ms)
        if row is None:
            raise UnknownBlueprint(blueprint_id)
        return self._decode(blueprint_id, row[0])

    def quarantine_reason(self, blueprint_id: str) -> str | None:
        """Why `blueprint_id` is quarantined, or None when it is not."""
        with self._lock:
            row = self._query_one(
                "SELECT quarantine_reason FROM blueprints WHERE blueprint_id = ?", (blueprint_id,)
            )
        if row is None:
            raise UnknownBlueprint(blueprint_id)
        return None if row[0] is None else str(row[0])

    def ids_for(self, kind: str) -> builtins.list[str]:
        """Ids of the blueprints that can be built for host `kind`, quarantined ones excluded, in order."""
        return [
            str(descriptor.blueprint_id)
            for descriptor in self.list()
            if kind in descriptor.host_kinds and not descriptor.quarantine
        ]

    def build(self, blueprint_id: str, width: int, kind: str, **params: float) -> nn.Module:
        """A fresh module of `blueprint_id` for a slot of `width` in a host of `kind`.

        Raises `UnknownBlueprint`, `BlueprintQuarantined`, or `BlueprintNotApplicable` (wrong kind, bad
        width, unknown parameter or one outside the descriptor's bounds).
        """
        descriptor = self.get(blueprint_id)
        if descriptor.quarantine:
            raise BlueprintQuarantined(
                blueprint_id, self.quarantine_reason(blueprint_id) or "no reason given"
            )
        spec = self._factories.get(blueprint_id)
        return build_blueprint(spec, descriptor, width, kind, params)

    def param_count(self, blueprint_id: str, width: int, kind: str, **params: float) -> int:
        """Parameters of `blueprint_id` at this width and kind, counted on a module really built (on the
        `meta` device, drawing nothing from the global random generator: `blueprints.count_built`)."""
        return count_built(lambda: self.build(blueprint_id, width, kind, **params))

    # --- changing ----------------------------------------------------------------------------------

    @property
    def pending_notifications(self) -> int:
        """Changes committed but not yet published (waiting in the outbox)."""
        with self._lock:
            row = self._query_one("SELECT COUNT(*) FROM outbox")
        return int(row[0]) if row else 0

    def publish_pending(self) -> int:
        """Publish every change waiting in the outbox, oldest first; returns how many were published.

        Raises `NotificationFailed` (the changes stay in the outbox) if the publisher fails, and
        `RuntimeError` if this catalogue has no publisher.
        """
        if self._publisher is None:
            raise RuntimeError(f"catalogue {self.path} has no publisher to send its outbox to")
        with self._lock:
            rows = self._query_all("SELECT revision, change FROM outbox ORDER BY revision")
        if not rows:
            return 0
        changes = []
        for revision, blob in rows:
            change = pb.CatalogueChange()
            try:
                change.ParseFromString(blob)
            except (DecodeError, ValueError, RuntimeError, TypeError) as exc:
                raise CatalogueCorrupt(self.path, f"outbox entry {revision} does not decode: {exc}") from exc
            changes.append(change)
        try:
            self._publisher.publish(changes)
        except EsperError as exc:  # the bus's typed errors; the outbox keeps the changes
            raise NotificationFailed(int(rows[-1][0]), len(rows), exc) from exc
        published = [(int(row[0]),) for row in rows]
        with self._lock, self._transaction():
            self._db.executemany("DELETE FROM outbox WHERE revision = ?", published)
        return len(published)

    def subscribe(self, callback: Listener) -> None:
        """Call `callback` with every committed change from now on."""
        with self._lock:
            self._listeners.append(callback)

    def add(self, descriptor: pb.BlueprintDescriptor) -> pb.BlueprintDescriptor:
        """Add a new blueprint (a factory must be registered for its id); returns it as stored."""
        _validate_descriptor(descriptor)
        blueprint_id = str(descriptor.blueprint_id)
        self._factories.get(blueprint_id)
        with self._lock, self._transaction():
            if self._query_one("SELECT 1 FROM blueprints WHERE blueprint_id = ?", (blueprint_id,)):
                raise DuplicateBlueprint(blueprint_id)
            change = self._store(pb.CATALOGUE_CHANGE_ADDED, descriptor, insert=True, quarantine_reason=None)
        return self._announce(change)

    def update(self, descriptor: pb.BlueprintDescriptor) -> pb.BlueprintDescriptor:
        """Replace an existing blueprint's descriptor (its revision is assigned here); returns it as stored.

        Lifting the quarantine flag through an update clears the recorded reason.
        """
        _validate_descriptor(descriptor)
        blueprint_id = str(descriptor.blueprint_id)
        with self._lock, self._transaction():
            row = self._query_one(
                "SELECT quarantine_reason FROM blueprints WHERE blueprint_id = ?", (blueprint_id,)
            )
            if row is None:
                raise UnknownBlueprint(blueprint_id)
            reason = (row[0] or "quarantined by an update") if descriptor.quarantine else None
            change = self._store(
                pb.CATALOGUE_CHANGE_UPDATED, descriptor, insert=False, quarantine_reason=reason
            )
        return self._announce(change)

    def quarantine(self, blueprint_id: str, reason: str) -> pb.BlueprintDescriptor:
        """Mark `blueprint_id` quarantined for `reason`: still listed, never offered or built."""
        if not reason:
            raise InvalidDescriptor(blueprint_id, "quarantine reason", "is required and was empty")
        with self._lock, self._transaction():
            descriptor = self.get(blueprint_id)
            descriptor.quarantine = True
            change = self._store(
                pb.CATALOGUE_CHANGE_QUARANTINED, descriptor, insert=False, quarantine_reason=reason
            )
        return self._announce(change)

    def unquarantine(self, blueprint_id: str) -> pb.BlueprintDescriptor:
        """Lift the quarantine of `blueprint_id` (announced as an UPDATE); returns it as stored."""
        with self._lock, self._transaction():
            descriptor = self.get(blueprint_id)
            if not descriptor.quarantine:
                raise InvalidDescriptor(blueprint_id, "quarantine", "cannot be lifted: it is not quarantined")
            descriptor.quarantine = False
            change = self._store(
                pb.CATALOGUE_CHANGE_UPDATED, descriptor, insert=False, quarantine_reason=None
            )
        return self._announce(change)

    def remove(self, blueprint_id: str) -> None:
        """Delete `blueprint_id` from the catalogue."""
        with self._lock, self._transaction():
            descriptor = self.get(blueprint_id)
            descriptor.revision = self._bump_revision()
            self._db.execute("DELETE FROM blueprints WHERE blueprint_id = ?", (blueprint_id,))
            change = self._record(pb.CATALOGUE_CHANGE_REMOVED, descriptor)
        self._announce(change)

    # --- internals ---------------------------------------------------------------------------------

    def _seed_builtins(self) -> None:
        with self._lock, self._transaction():
            seeded = {str(row[0]) for row in self._query_all("SELECT blueprint_id FROM seeded")}
            present = {str(row[0]) for row in self._query_all("SELECT blueprint_id FROM blueprints")}
            for spec in self._factories:
                blueprint_id = spec.blueprint_id
                if blueprint_id in seeded:
                    continue
                self._db.execute("INSERT INTO seeded (blueprint_id) VALUES (?)", (blueprint_id,))
                if blueprint_id not in present:
                    self._store(
                        pb.CATALOGUE_CHANGE_ADDED, spec.descriptor, insert=True, quarantine_reason=None
                    )

    def _check_schema(self) -> None:
        row = self._query_one("SELECT value FROM meta WHERE key = 'schema_version'")
        if row is None:
            self._query_one("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            self._query_one("INSERT OR IGNORE INTO meta (key, value) VALUES ('revision', 0)")
        elif row[0] != SCHEMA_VERSION:
            raise CatalogueCorrupt(self.path, f"schema version {row[0]!r}, expected {SCHEMA_VERSION}")

    def _transaction(self, operation: str = "write") -> AbstractContextManager[sqlite3.Connection]:
        return sqlite_files.transaction(self._db, operation, self._error)

    def _error(self, operation: str, exc: sqlite3.Error) -> CatalogueCorrupt:
        return CatalogueCorrupt(self.path, f"{operation} failed: {type(exc).__name__}: {exc}")

    def _bump_revision(self) -> int:
        row = self._query_one("UPDATE meta SET value = value + 1 WHERE key = 'revision' RETURNING value")
        if row is None:
            raise CatalogueCorrupt(self.path, "the revision counter is missing")
        return int(row[0])

    def _store(
        self, kind: int, descriptor: pb.BlueprintDescriptor, *, insert: bool, quarantine_reason: str | None
    ) -> pb.CatalogueChange:
        stored = pb.BlueprintDescriptor()
        stored.CopyFrom(descriptor)
        stored.revision = self._bump_revision()
        blob = serialize(stored)
        if insert:
            self._db.execute(
                "INSERT INTO blueprints (blueprint_id, descriptor, quarantine_reason) VALUES (?, ?, ?)",
                (stored.blueprint_id, blob, quarantine_reason),
            )
        else:
            self._db.execute(
                "UPDATE blueprints SET descriptor = ?, quarantine_reason = ? WHERE blueprint_id = ?",
                (blob, quarantine_reason, stored.blueprint_id),
            )
        return self._record(kind, stored)

    def _record(self, kind: int, descriptor: pb.BlueprintDescriptor) -> pb.CatalogueChange:
        """The change of `descriptor`, written to the outbox inside the caller's transaction."""
        change = pb.CatalogueChange(
            kind=kind,
            blueprint_id=descriptor.blueprint_id,
            revision=descriptor.revision,
            issued_at=timestamp_from_ns(self._clock.wall_ns()),
        )
        change.descriptor.CopyFrom(descriptor)
        self._db.execute(
            "INSERT INTO outbox (revision, change) VALUES (?, ?)", (change.revision, serialize(change))
        )
        return change

    def _announce(self, change: pb.CatalogueChange) -> pb.BlueprintDescriptor:
        """After the commit: publish the outbox (if there is a publisher), then call the listeners."""
        descriptor = change.descriptor
        failed: NotificationFailed | None = None
        if self._publisher is not None:
            try:
                self.publish_pending()
            except NotificationFailed as exc:
                logger.error("urza: %s", exc)
                failed = exc
        with self._lock:
            listeners = list(self._listeners)
        errors: builtins.list[BaseException] = []
        for listener in listeners:
            notice = pb.CatalogueChange()
            notice.CopyFrom(change)
            try:
                listener(notice)
            except Exception as exc:  # noqa: BLE001 (collected and re-raised below as ListenerFailed)
                errors.append(exc)
        if errors:
            if failed is not None:
                errors.append(failed)
            raise ListenerFailed(str(descriptor.blueprint_id), int(descriptor.revision), errors) from errors[
                0
            ]
        if failed is not None:
            raise failed
        stored = pb.BlueprintDescriptor()
        stored.CopyFrom(descriptor)
        return stored

    def _decode(self, blueprint_id: str, blob: object) -> pb.BlueprintDescriptor:
        if not isinstance(blob, bytes):
            raise CatalogueCorrupt(self.path, f"descriptor of {blueprint_id!r} is {type(blob).__name__}")
        descriptor = pb.BlueprintDescriptor()
        try:
            descriptor.ParseFromString(blob)
        except (DecodeError, ValueError, RuntimeError) as exc:
            raise CatalogueCorrupt(
                self.path, f"descriptor of {blueprint_id!r} does not decode: {exc}"
            ) from exc
        if descriptor.blueprint_id != blueprint_id:
            raise CatalogueCorrupt(
                self.path, f"row {blueprint_id!r} holds a descriptor for {descriptor.blueprint_id!r}"
            )
        return descriptor

    def _query_one_by(
        self, sql: str, args: tuple[Any, ...], blueprint_id: str, timeout_ms: float
    ) -> tuple[Any, ...] | None:
        """`_query_one` abandoned at a deadline: lock wait, busy wait and the query itself are bounded."""
        deadline = time.monotonic() + timeout_ms / 1000
        if not self._lock.acquire(timeout=timeout_ms / 1000):
            raise CatalogueTimeout(self.path, blueprint_id, timeout_ms)
        try:
            remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
            self._db.execute(f"PRAGMA busy_timeout = {remaining_ms}")
            self._db.set_progress_handler(lambda: int(time.monotonic() > deadline), _DEADLINE_CHECK_EVERY)
            try:
                row: tuple[Any, ...] | None = self._db.execute(sql, args).fetchone()
            except sqlite3.OperationalError as exc:
                text = str(exc)
                if "interrupted" in text or "locked" in text or "busy" in text:
                    raise CatalogueTimeout(self.path, blueprint_id, timeout_ms) from exc
                raise CatalogueCorrupt(self.path, f"{type(exc).__name__}: {exc}") from exc
            except sqlite3.DatabaseError as exc:
                raise CatalogueCorrupt(self.path, f"{type(exc).__name__}: {exc}") from exc
            finally:
                self._db.set_progress_handler(None, 0)
                self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            return row
        finally:
            self._lock.release()

    def _query_one(self, sql: str, args: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
        try:
            row: tuple[Any, ...] | None = self._db.execute(sql, args).fetchone()
        except sqlite3.DatabaseError as exc:
            raise CatalogueCorrupt(self.path, f"{type(exc).__name__}: {exc}") from exc
        return row

    def _query_all(self, sql: str, args: tuple[Any, ...] = ()) -> builtins.list[tuple[Any, ...]]:
        try:
            rows: builtins.list[tuple[Any, ...]] = self._db.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as exc:
            raise CatalogueCorrupt(self.path, f"{type(exc).__name__}: {exc}") from exc
        return rows
