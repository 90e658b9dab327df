"""The embedded backend: the bus in one SQLite file, shared by the processes of one machine.

Every state change is one `BEGIN IMMEDIATE` transaction (the write lock is taken up front, so two
processes never deadlock upgrading a read lock), in WAL mode with `synchronous=FULL`: a publish that
returned survives a crash of the process or the machine. A blocking consume polls with a short sleep.

Message ids are per-stream sequence numbers (`"1"`, `"2"`, ...), so order within a stream is the order of
the ids. Time for idle timeouts is the wall clock (shared by every process of the machine).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from esper.leyline import (
    SYSTEM_CLOCK,
    Clock,
    MalformedMessage,
    pb,
    serialize,
)
from esper.leyline import sqlite as sqlite_files
from esper.leyline.sqlite import Migration
from esper.oona.bus import (
    BusError,
    BusUnavailable,
    Delivery,
    GroupNotFound,
    GroupStats,
    InvalidMessageId,
    Streams,
    StreamStats,
    dead_letter_envelope,
    decode_envelope,
    encode_envelope,
    summarise_streams,
    undecodable_envelope,
)
from esper.oona.settings import OonaSettings

logger = logging.getLogger(__name__)

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS streams (name TEXT PRIMARY KEY, last_seq INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS messages (stream TEXT NOT NULL, seq INTEGER NOT NULL, body BLOB NOT NULL,"
    " PRIMARY KEY (stream, seq))",
    "CREATE TABLE IF NOT EXISTS groups (stream TEXT NOT NULL, name TEXT NOT NULL,"
    " last_seq INTEGER NOT NULL, PRIMARY KEY (stream, name))",
    "CREATE TABLE IF NOT EXISTS consumers (stream TEXT NOT NULL, grp TEXT NOT NULL, name TEXT NOT NULL,"
    " PRIMARY KEY (stream, grp, name))",
    "CREATE TABLE IF NOT EXISTS pending (stream TEXT NOT NULL, grp TEXT NOT NULL, seq INTEGER NOT NULL,"
    " consumer TEXT NOT NULL, delivered_ms INTEGER NOT NULL, deliveries INTEGER NOT NULL,"
    " PRIMARY KEY (stream, grp, seq))",
)
# A bus file written before migrations were recorded has these tables already: step 1 records them.
MIGRATIONS = (Migration(1, "streams, messages, groups, consumers and pending deliveries", _SCHEMA),)


class EmbeddedBus:
    """The `Bus` on a SQLite file; safe to share between threads and between processes."""

    def __init__(self, path: Path, settings: OonaSettings, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self.path = Path(path)
        self.settings = settings
        self._clock = clock
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db: sqlite3.Connection | None = sqlite_files.open_store(
            self.path,
            timeout_s=settings.busy_timeout_ms / 1000,
            where=f"embedded bus {self.path}",
            migrations=MIGRATIONS,
            now_ns=clock.wall_ns,
            error=self._error,
            refused=lambda exc: BusError(f"{self.path}: {exc}"),
        )

    def __repr__(self) -> str:
        return f"EmbeddedBus({str(self.path)!r})"

    # -- plumbing ------------------------------------------------------------------------------------

    def _error(self, operation: str, exc: sqlite3.Error) -> BusError:
        text = str(exc)
        if isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text):
            return BusUnavailable(operation, f"sqlite:{self.path}", 1, text)
        return BusError(f"{operation} on sqlite:{self.path} failed: {text}")

    @contextmanager
    def _transaction(self, operation: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._db is None:
                raise BusError(f"{operation}: {self!r} is closed")
            with sqlite_files.transaction(self._db, operation, self._error) as db:
                yield db

    def _now_ms(self) -> int:
        return self._clock.wall_ns() // 1_000_000

    def _append(self, db: sqlite3.Connection, stream: str, bodies: list[bytes]) -> list[str]:
        row = db.execute("SELECT last_seq FROM streams WHERE name = ?", (stream,)).fetchone()
        first = (row[0] if row else 0) + 1
        seqs = list(range(first, first + len(bodies)))
        db.executemany(
            "INSERT INTO messages (stream, seq, body) VALUES (?, ?, ?)",
            [(stream, seq, body) for seq, body in zip(seqs, bodies, strict=True)],
        )
        last = seqs[-1] if seqs else first - 1
        db.execute(
            "INSERT INTO streams (name, last_seq) VALUES (?, ?)"
            " ON CONFLICT(name) DO UPDATE SET last_seq = excluded.last_seq",
            (stream, last),
        )
        db.execute(
            "DELETE FROM messages WHERE stream = ? AND seq <= ?", (stream, last - self.settings.maxlen)
        )
        return [str(seq) for seq in seqs]

    def _require_group(self, db: sqlite3.Connection, stream: str, group: str) -> int:
        row = db.execute(
            "SELECT last_seq FROM groups WHERE stream = ? AND name = ?", (stream, group)
        ).fetchone()
        if row is None:
            raise GroupNotFound(stream, group)
        return int(row[0])

    def _register_consumer(self, db: sqlite3.Connection, stream: str, group: str, consumer: str) -> None:
        db.execute(
            "INSERT OR IGNORE INTO consumers (stream, grp, name) VALUES (?, ?, ?)", (stream, group, consumer)
        )

    def _dead_letter(self, db: sqlite3.Connection, stream: str, envelope: pb.BusEnvelope) -> None:
        self._append(db, Streams.dead_letter(stream), [serialize(envelope)])

    @staticmethod
    def _seq(stream: str, message_id: str) -> int:
        try:
            return int(message_id)
        except ValueError:
            raise InvalidMessageId(stream, message_id) from None

    # -- the Bus interface ---------------------------------------------------------------------------

    def publish(self, stream: str, envelope: pb.BusEnvelope) -> str:
        """Append `envelope` to `stream` in one durable transaction; return its sequence number."""
        return self.publish_many(stream, [envelope])[0]

    def publish_many(self, stream: str, envelopes: list[pb.BusEnvelope]) -> list[str]:
        """Append several envelopes in one transaction (all or none)."""
        bodies = [encode_envelope(stream, e, self.settings.max_payload_bytes) for e in envelopes]
        with self._transaction(f"publish to {stream}") as db:
            return self._append(db, stream, bodies)

    def ensure_group(self, stream: str, group: str, *, from_beginning: bool = True) -> None:
        """Create `group` on `stream` if absent, at the start of the stream or after its last message."""
        with self._transaction(f"create group {group} on {stream}") as db:
            start = 0
            if not from_beginning:
                row = db.execute("SELECT last_seq FROM streams WHERE name = ?", (stream,)).fetchone()
                start = row[0] if row else 0
            db.execute(
                "INSERT OR IGNORE INTO groups (stream, name, last_seq) VALUES (?, ?, ?)",
                (stream, group, start),
            )

    def delete_group(self, stream: str, group: str) -> None:
        """Remove `group`, its consumers and its pending entries."""
        with self._transaction(f"delete group {group} on {stream}") as db:
            for table, column in (("groups", "name"), ("consumers", "grp"), ("pending", "grp")):
                db.execute(f"DELETE FROM {table} WHERE stream = ? AND {column} = ?", (stream, group))

    def consume(
        self, stream: str, group: str, consumer: str, *, count: int = 1, block_ms: int = 0
    ) -> list[Delivery]:
        """Deliver up to `count` new messages; with `block_ms`, poll until one arrives or time is up."""
        # Real time, not the injected clock: a block is a wait of this process, not message age.
        deadline = time.monotonic() + block_ms / 1000
        while True:
            deliveries = self._consume_once(stream, group, consumer, count)
            if deliveries or time.monotonic() >= deadline:
                return deliveries
            time.sleep(self.settings.poll_interval_ms / 1000)

    def _consume_once(self, stream: str, group: str, consumer: str, count: int) -> list[Delivery]:
        with self._transaction(f"consume from {stream}") as db:
            last = self._require_group(db, stream, group)
            rows = db.execute(
                "SELECT seq, body FROM messages WHERE stream = ? AND seq > ? ORDER BY seq LIMIT ?",
                (stream, last, count),
            ).fetchall()
            if not rows:
                return []
            self._register_consumer(db, stream, group, consumer)
            now = self._now_ms()
            deliveries = []
            for seq, body in rows:
                try:
                    envelope = decode_envelope(body)
                except MalformedMessage as exc:
                    logger.warning(
                        "oona: %s message %s is not an envelope, dead-lettered: %s", stream, seq, exc
                    )
                    self._dead_letter(db, stream, undecodable_envelope(body, exc))
                    continue
                db.execute(
                    "INSERT OR REPLACE INTO pending (stream, grp, seq, consumer, delivered_ms, deliveries)"
                    " VALUES (?, ?, ?, ?, ?, 1)",
                    (stream, group, seq, consumer, now),
                )
                deliveries.append(Delivery(stream, str(seq), envelope, 1))
            db.execute(
                "UPDATE groups SET last_seq = ? WHERE stream = ? AND name = ?", (rows[-1][0], stream, group)
            )
            return deliveries

    def ack(self, stream: str, group: str, message_ids: list[str]) -> int:
        """Remove the messages from `group`'s pending entries; returns how many were pending."""
        seqs = [(stream, group, self._seq(stream, mid)) for mid in message_ids]
        with self._transaction(f"ack on {stream}") as db:
            before = db.total_changes
            db.executemany("DELETE FROM pending WHERE stream = ? AND grp = ? AND seq = ?", seqs)
            return db.total_changes - before

    def reclaim(
        self, stream: str, group: str, consumer: str, *, min_idle_ms: int, count: int = 10
    ) -> list[Delivery]:
        """Take over pending messages idle for `min_idle_ms`; dead-letter those out of deliveries."""
        with self._transaction(f"reclaim on {stream}") as db:
            self._require_group(db, stream, group)
            now = self._now_ms()
            rows = db.execute(
                "SELECT p.seq, p.deliveries, m.body FROM pending AS p"
                " LEFT JOIN messages AS m ON m.stream = p.stream AND m.seq = p.seq"
                " WHERE p.stream = ? AND p.grp = ? AND p.delivered_ms <= ? ORDER BY p.seq LIMIT ?",
                (stream, group, now - min_idle_ms, count),
            ).fetchall()
            if rows:
                self._register_consumer(db, stream, group, consumer)
            deliveries = []
            for seq, delivered, body in rows:
                key = (stream, group, seq)
                if body is None:
                    # Trimmed away while pending (as Redis drops such entries in XAUTOCLAIM).
                    db.execute("DELETE FROM pending WHERE stream = ? AND grp = ? AND seq = ?", key)
                    continue
                try:
                    envelope = decode_envelope(body)
                except MalformedMessage as exc:
                    self._dead_letter(db, stream, undecodable_envelope(body, exc))
                    db.execute("DELETE FROM pending WHERE stream = ? AND grp = ? AND seq = ?", key)
                    continue
                if delivered >= self.settings.max_deliveries:
                    reason = f"not acked after {delivered} deliveries"
                    dead = dead_letter_envelope(
                        envelope, source_id=str(seq), group=group, deliveries=delivered, reason=reason
                    )
                    self._dead_letter(db, stream, dead)
                    db.execute("DELETE FROM pending WHERE stream = ? AND grp = ? AND seq = ?", key)
                    logger.warning(
                        "oona: %s message %s dead-lettered for group %s: %s", stream, seq, group, reason
                    )
                    continue
                db.execute(
                    "UPDATE pending SET consumer = ?, delivered_ms = ?, deliveries = deliveries + 1"
                    " WHERE stream = ? AND grp = ? AND seq = ?",
                    (consumer, now, *key),
                )
                deliveries.append(Delivery(stream, str(seq), envelope, delivered + 1))
            return deliveries

    def stats(self) -> list[StreamStats]:
        """Lengths, groups with pending counts, and dead-letter counts of every stream."""
        with self._transaction("stats") as db:
            lengths = dict(db.execute("SELECT stream, COUNT(*) FROM messages GROUP BY stream").fetchall())
            names = {row[0] for row in db.execute("SELECT name FROM streams")}
            groups = db.execute(
                "SELECT g.stream, g.name,"
                " (SELECT COUNT(*) FROM consumers AS c WHERE c.stream = g.stream AND c.grp = g.name),"
                " (SELECT COUNT(*) FROM pending AS p WHERE p.stream = g.stream AND p.grp = g.name)"
                " FROM groups AS g ORDER BY g.stream, g.name"
            ).fetchall()
            names.update(row[0] for row in groups)
        by_stream: dict[str, list[GroupStats]] = {}
        for stream, name, consumers, pending in groups:
            by_stream.setdefault(stream, []).append(GroupStats(name, consumers, pending))
        return summarise_streams(names, lengths, by_stream)

    def close(self) -> None:
        """Close the SQLite connection; later calls raise `BusError`."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
