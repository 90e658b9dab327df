"""The one SQLite helper of Esper: WAL and synchronous=FULL, BEGIN IMMEDIATE transactions rolled back
whole, recorded migrations, corruption told apart; Tamiyo's store, the bus and the catalogue use it."""

from __future__ import annotations

import sqlite3
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from esper.leyline import ContractVersionMismatch, EsperError
from esper.leyline import sqlite as sqlite_files
from esper.leyline.sqlite import (
    Migration,
    MigrationError,
    WalRefused,
    configure,
    connect,
    is_corruption,
    migrate,
    open_store,
    transaction,
)
from esper.oona import EmbeddedBus, OonaSettings
from esper.tamiyo import TamiyoStore
from esper.urza import BlueprintCatalogue


class Typed(EsperError):
    def __init__(self, operation: str, exc: sqlite3.Error) -> None:
        self.operation = operation
        super().__init__(f"{operation}: {exc}")


class Refused(EsperError):
    def __init__(self, exc: WalRefused | MigrationError) -> None:
        self.exc = exc
        super().__init__(f"refused: {exc}")


def opened(path: Path) -> sqlite3.Connection:
    db = connect(path, timeout_s=1.0)
    configure(db, path, f"test file {path}")
    return db


STEPS = (
    Migration(1, "a table", ("CREATE TABLE a (x INTEGER)",)),
    Migration(2, "a column", ("ALTER TABLE a ADD COLUMN y INTEGER",)),
)


def test_a_file_is_opened_in_wal_mode_with_full_sync(tmp_path: Path) -> None:
    db = opened(tmp_path / "f.sqlite3")
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        db.close()


def test_a_failed_transaction_is_rolled_back_whole_and_leaves_as_the_typed_error(tmp_path: Path) -> None:
    db = opened(tmp_path / "f.sqlite3")
    try:
        with transaction(db, "create", Typed) as t:
            t.execute("CREATE TABLE a (x INTEGER PRIMARY KEY)")
        with pytest.raises(Typed, match="insert twice"), transaction(db, "insert twice", Typed) as t:
            t.execute("INSERT INTO a VALUES (1)")
            t.execute("INSERT INTO a VALUES (1)")  # a constraint failure half-way
        assert db.execute("SELECT COUNT(*) FROM a").fetchone()[0] == 0
        with pytest.raises(KeyError), transaction(db, "not SQL", Typed) as t:
            t.execute("INSERT INTO a VALUES (2)")
            raise KeyError("the caller's own error passes unchanged")
        assert db.execute("SELECT COUNT(*) FROM a").fetchone()[0] == 0
        assert not db.in_transaction
    finally:
        db.close()


def test_migrations_are_applied_once_each_and_a_newer_file_is_refused(tmp_path: Path) -> None:
    db = opened(tmp_path / "f.sqlite3")
    now = iter(range(100))

    def begin(operation: str) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(db, operation, Typed)

    try:
        assert migrate(begin, STEPS[:1], now_ns=lambda: next(now)) == 0
        assert migrate(begin, STEPS, now_ns=lambda: next(now)) == 1
        assert migrate(begin, STEPS, now_ns=lambda: next(now)) == 2
        assert [r[0] for r in db.execute("SELECT version FROM schema_migrations")] == [1, 2]
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
        with pytest.raises(MigrationError, match="newer") as refused:
            migrate(begin, STEPS[:1], now_ns=lambda: next(now))
        assert (refused.value.found, refused.value.supported) == (2, 1)
        broken = (*STEPS, Migration(3, "broken", ("CREATE TABLE b (z)", "NOT SQL")))
        with pytest.raises(MigrationError) as failed:
            migrate(begin, broken, now_ns=lambda: next(now))
        assert isinstance(failed.value.cause, Typed)
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "b" not in tables  # the failed step was rolled back whole
    finally:
        db.close()


def test_a_damaged_file_is_told_apart_from_a_failed_write(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"not a database at all, " * 200)
    db = sqlite3.connect(garbage)
    try:
        with pytest.raises(sqlite3.DatabaseError) as damaged:
            db.execute("SELECT * FROM sqlite_master").fetchall()
    finally:
        db.close()
    assert is_corruption(damaged.value)
    assert not is_corruption(sqlite3.OperationalError("database is locked"))


def open_test_store(path: Path, migrations: tuple[Migration, ...] = STEPS) -> sqlite3.Connection:
    return open_store(
        path,
        timeout_s=1.0,
        where=f"test store {path}",
        migrations=migrations,
        now_ns=lambda: 7,
        error=Typed,
        refused=Refused,
    )


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> list[sqlite3.Connection]:
    """Every connection `open_store` makes, to see that a failed open closed it."""
    made: list[sqlite3.Connection] = []

    def connect_and_keep(path: Path, *, timeout_s: float) -> sqlite3.Connection:
        db = connect(path, timeout_s=timeout_s)
        made.append(db)
        return db

    monkeypatch.setattr(sqlite_files, "connect", connect_and_keep)
    return made


def is_closed(db: sqlite3.Connection) -> bool:
    try:
        db.execute("SELECT 1")
    except sqlite3.ProgrammingError:
        return True
    return False


def test_open_store_returns_the_file_configured_and_migrated(tmp_path: Path) -> None:
    db = open_test_store(tmp_path / "f.sqlite3")
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert db.execute("SELECT version, applied_at_ns FROM schema_migrations").fetchall() == [
            (1, 7),
            (2, 7),
        ]
        assert db.isolation_level is None  # autocommit: transactions are explicit
    finally:
        db.close()


def test_a_damaged_file_fails_to_open_as_the_callers_error_and_is_closed(
    tmp_path: Path, connections: list[sqlite3.Connection]
) -> None:
    path = tmp_path / "f.sqlite3"
    path.write_bytes(b"not a database at all, " * 200)
    with pytest.raises(Typed, match=r"^open: file is not a database") as failed:
        open_test_store(path)
    assert failed.value.operation == "open"
    assert isinstance(failed.value.__cause__, sqlite3.DatabaseError)
    assert len(connections) == 1 and is_closed(connections[0])


def test_a_file_that_cannot_be_opened_at_all_fails_as_the_callers_error(tmp_path: Path) -> None:
    with pytest.raises(Typed, match=r"^open: unable to open database file"):
        open_test_store(tmp_path)  # a directory


def test_a_refused_migration_fails_to_open_as_the_callers_refusal_and_is_closed(
    tmp_path: Path, connections: list[sqlite3.Connection]
) -> None:
    path = tmp_path / "f.sqlite3"
    open_test_store(path).close()
    with pytest.raises(Refused, match="newer than this code supports") as newer:
        open_test_store(path, STEPS[:1])
    assert isinstance(newer.value.exc, MigrationError)
    broken = (*STEPS, Migration(3, "broken", ("NOT SQL",)))
    with pytest.raises(Refused, match="cannot be migrated") as failed:
        open_test_store(path, broken)
    assert isinstance(failed.value.exc, MigrationError) and isinstance(failed.value.exc.cause, Typed)
    assert len(connections) == 3 and all(is_closed(db) for db in connections)


def test_a_file_of_another_contract_fails_to_open_as_a_mismatch_and_is_closed(
    tmp_path: Path, connections: list[sqlite3.Connection]
) -> None:
    path = tmp_path / "f.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE written_before_the_contract_was_recorded (x INTEGER)")
    db.close()
    with pytest.raises(ContractVersionMismatch, match=f"test store {path}"):
        open_test_store(path)
    assert len(connections) == 1 and is_closed(connections[0])


def test_the_store_the_bus_and_the_catalogue_record_their_migrations(tmp_path: Path) -> None:
    TamiyoStore(tmp_path / "tamiyo.sqlite3").close()
    EmbeddedBus(tmp_path / "bus.sqlite3", OonaSettings()).close()
    BlueprintCatalogue.open_default(tmp_path / "urza.sqlite3").close()
    for name in ("tamiyo.sqlite3", "bus.sqlite3", "urza.sqlite3"):
        db = sqlite3.connect(tmp_path / name)
        try:
            versions = [row[0] for row in db.execute("SELECT version FROM schema_migrations")]
            assert versions and versions == sorted(versions), name
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal", name
        finally:
            db.close()
