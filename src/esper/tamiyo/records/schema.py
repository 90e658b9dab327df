"""The Tamiyo store's schema: its migrations, the rows it hands out, and the checksums its records carry."""

from __future__ import annotations

import sqlite3
import zlib
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

from google.protobuf.message import Message

from esper.leyline import (
    pb,
)
from esper.oona import Streams

OutboxStatus = Literal["pending", "published", "dropped"]
OutboxKind = Literal["field_report", "decision"]
OUTBOX_STATUSES: tuple[OutboxStatus, ...] = ("pending", "published", "dropped")
STREAM_OF_KIND: dict[OutboxKind, str] = {"field_report": Streams.FIELD_REPORTS, "decision": Streams.DECISIONS}
NS_PER_DAY = 86_400 * 1_000_000_000
M = TypeVar("M", bound=Message)
StoreEventSink = Callable[[str, str, Mapping[str, str]], None]


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


OUTBOX_STATE = (
    "status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'published', 'dropped')),"
    " attempts INTEGER NOT NULL DEFAULT 0, next_attempt_ns INTEGER NOT NULL,"
    " last_error TEXT NOT NULL DEFAULT '', updated_at_ns INTEGER NOT NULL"
)
# kind -> (table, key column, key of the entry: its ref_id or its command_id)
OUTBOX_TABLES: dict[OutboxKind, tuple[str, str]] = {
    "field_report": ("field_reports", "report_id"),
    "decision": ("decisions", "command_id"),
}
# The eight fields of an `OutboxEntry`, then what its checksum covers besides them.
OUTBOX_SELECT = (
    "SELECT 'field_report', report_id, command_id, report, status, attempts, next_attempt_ns, last_error,"
    " training_run_id, issued_at_ns, outcome, checksum FROM field_reports WHERE {where} UNION ALL"
    " SELECT 'decision', decision_id, command_id, record, status, attempts, next_attempt_ns, last_error,"
    " training_run_id, issued_at_ns, NULL, checksum FROM decisions WHERE {where}"
)

# An entry may leave once its run's release horizon (the step of its newest durable checkpoint) covers
# the step it was written as of. Without a horizon the bound (the parameter) decides: everything leaves
# (`RELEASE_ALL`), or nothing until the run's first checkpoint (`HOLD_ALL`). Entries written as of no
# step (NULL) are never held. The subquery's bare `training_run_id` is the outer table's column.
RELEASED = (
    "(as_of_step IS NULL OR as_of_step <= COALESCE((SELECT step FROM release_horizons"
    " WHERE run_id = training_run_id), ?))"
)
RELEASE_ALL = 2**63 - 1
HOLD_ALL = -1
SET_HORIZON = (
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
            f" {OUTBOX_STATE})",
            "CREATE INDEX decisions_due ON decisions (next_attempt_ns) WHERE status = 'pending'",
            "CREATE TABLE field_reports (report_id TEXT PRIMARY KEY, command_id TEXT NOT NULL,"
            " training_run_id TEXT NOT NULL, outcome INTEGER NOT NULL, issued_at_ns INTEGER NOT NULL,"
            f" report BLOB NOT NULL, {OUTBOX_STATE}) WITHOUT ROWID",
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
            # Existing rows get the checksum of what they hold now (`esper_checksum` is `checksum`).
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
CORRUPTION_MARKERS = ("malformed", "not a database", "file is encrypted", "corrupt")


def is_corruption(exc: sqlite3.Error) -> bool:
    text = str(exc).lower()
    return isinstance(exc, sqlite3.DatabaseError) and any(marker in text for marker in CORRUPTION_MARKERS)


def floats(blob: bytes) -> list[float]:
    values = array("d")
    values.frombytes(blob)
    return values.tolist()


# ------------------------------------------------------------------------------------------------------
# Record checksums
# ------------------------------------------------------------------------------------------------------


def record_checksum(blob: bytes, *keys: object) -> int:
    """CRC32 over a record's key columns and payload, as they read back from SQLite.

    Callers pass each value with the type its column returns (`int` for INTEGER, `float` for REAL, `str`
    for TEXT, None for NULL), so the checksum of a written row equals the one computed on reading it.
    CRC32 catches every single-bit flip and every burst up to 32 bits; this guards against damage, not
    against someone who rewrites rows on purpose.
    """
    return zlib.crc32(blob, zlib.crc32("\x1f".join([str(key) for key in keys]).encode()))


def window_checksum(row: Sequence[object]) -> int:
    return record_checksum(b"", *row)
