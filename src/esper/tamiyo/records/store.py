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

from array import array

from esper.tamiyo.model.normalizer_state import NormalizerState
from esper.tamiyo.records.decision_rows import DecisionRows
from esper.tamiyo.records.outbox_rows import OutboxRows
from esper.tamiyo.records.schema import NS_PER_DAY, RetentionResult, floats


class TamiyoStore(DecisionRows, OutboxRows):
    """Every durable thing of Tamiyo, behind one lock and one SQLite connection.

    Safe to share between the service's thread and its outbox publisher thread. `verify=True` runs
    SQLite's `quick_check` on open, so a damaged file is refused before anything is read from it.
    Acknowledged writes lost to WAL damage are `StoreRecordsLost` at open, unless `accept_loss` (then a
    `tamiyo_store_records_lost` event). `events` receives the store's events (name, description,
    attributes); without it they are logged.
    """

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
            str(node_type): NormalizerState(floats(count), floats(mean), floats(m2))
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

    # -- retention ----------------------------------------------------------------------------------

    def apply_retention(self, retention_days: float, now_ns: int | None = None) -> RetentionResult:
        """Delete reports and decisions issued more than `retention_days` ago, in one transaction.

        A report or decision still pending publication is kept (it has not reached anyone yet), and so is a
        decision whose window is still open.
        """
        if retention_days <= 0:
            raise ValueError(f"retention_days must be > 0, got {retention_days}")
        now = self._clock.wall_ns() if now_ns is None else now_ns
        cutoff = now - int(retention_days * NS_PER_DAY)
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
