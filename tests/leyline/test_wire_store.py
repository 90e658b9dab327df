"""Stores of serialised Leyline messages record the contract version and refuse any other."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from esper.leyline import CONTRACT_VERSION, ContractVersionMismatch, guard_sqlite_contract


def _connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def test_a_new_database_records_the_contract_version_and_opens_again(tmp_path: Path) -> None:
    db = _connect(tmp_path / "store.sqlite3")
    guard_sqlite_contract(db, "store")
    db.execute("CREATE TABLE messages (body BLOB)")
    guard_sqlite_contract(db, "store")
    assert db.execute("SELECT version FROM leyline_contract").fetchall() == [(CONTRACT_VERSION,)]


def test_a_database_written_before_versions_were_recorded_is_refused(tmp_path: Path) -> None:
    db = _connect(tmp_path / "store.sqlite3")
    db.execute("CREATE TABLE messages (body BLOB)")
    with pytest.raises(ContractVersionMismatch) as info:
        guard_sqlite_contract(db, "store")
    assert (info.value.found, info.value.expected) == (1, CONTRACT_VERSION)
    assert "version 1" in str(info.value) and f"version {CONTRACT_VERSION}" in str(info.value)


def test_a_database_of_another_contract_version_is_refused(tmp_path: Path) -> None:
    db = _connect(tmp_path / "store.sqlite3")
    guard_sqlite_contract(db, "store")
    db.execute("UPDATE leyline_contract SET version = ?", (CONTRACT_VERSION + 1,))
    with pytest.raises(ContractVersionMismatch, match=f"version {CONTRACT_VERSION + 1}"):
        guard_sqlite_contract(db, "store")
