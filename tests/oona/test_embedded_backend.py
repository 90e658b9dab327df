"""What only the embedded backend has to show: its SQLite settings, injected time, corrupt rows."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from esper.leyline import CONTRACT_VERSION, ContractVersionMismatch, ManualClock, pb
from esper.oona import BusError, EmbeddedBus, InvalidMessageId, Streams, envelope_for
from esper.oona.bus import DEAD_LETTER_REASON
from tests.conftest import fast_oona_settings

STREAM = "s"


def signal_envelope(reason: str) -> pb.BusEnvelope:
    return envelope_for(pb.EmergencySignal(level=pb.EMERGENCY_LEVEL_NOTICE, reason=reason))


def test_the_file_is_in_wal_mode_with_full_sync(tmp_path: Path) -> None:
    bus = EmbeddedBus(tmp_path / "bus.sqlite3", fast_oona_settings())
    bus.publish(STREAM, signal_envelope("x"))
    bus.close()
    db = sqlite3.connect(tmp_path / "bus.sqlite3")
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()
    assert bus.settings.busy_timeout_ms > 0


def test_idle_time_follows_the_injected_clock(tmp_path: Path) -> None:
    clock = ManualClock()
    bus = EmbeddedBus(tmp_path / "bus.sqlite3", fast_oona_settings(), clock=clock)
    bus.publish(STREAM, signal_envelope("x"))
    bus.ensure_group(STREAM, "g")
    bus.consume(STREAM, "g", "c1")
    clock.advance(29.9)
    assert bus.reclaim(STREAM, "g", "c2", min_idle_ms=30_000) == []
    clock.advance(0.1)
    assert [d.delivery_count for d in bus.reclaim(STREAM, "g", "c2", min_idle_ms=30_000)] == [2]
    bus.close()


def test_a_corrupt_row_is_dead_lettered_and_the_stream_keeps_working(tmp_path: Path) -> None:
    path = tmp_path / "bus.sqlite3"
    bus = EmbeddedBus(path, fast_oona_settings())
    bus.ensure_group(STREAM, "g")
    bus.publish(STREAM, signal_envelope("victim"))
    good = bus.publish(STREAM, signal_envelope("fine"))
    db = sqlite3.connect(path)
    with db:
        db.execute("UPDATE messages SET body = ? WHERE stream = ? AND seq = 1", (b"\xff\xff\xff", STREAM))
    db.close()
    assert [d.message_id for d in bus.consume(STREAM, "g", "c", count=10)] == [good]
    bus.ensure_group(Streams.dead_letter(STREAM), "inspect")
    (dead,) = bus.consume(Streams.dead_letter(STREAM), "inspect", "c")
    assert dead.envelope.payload == b"\xff\xff\xff"
    assert dead.envelope.attributes[DEAD_LETTER_REASON].startswith("undecodable envelope")
    bus.close()


def test_ids_that_the_backend_never_issued_are_refused(tmp_path: Path) -> None:
    bus = EmbeddedBus(tmp_path / "bus.sqlite3", fast_oona_settings())
    bus.ensure_group(STREAM, "g")
    with pytest.raises(InvalidMessageId):
        bus.ack(STREAM, "g", ["1700000000000-0"])
    bus.close()


def test_a_closed_bus_refuses_work(tmp_path: Path) -> None:
    bus = EmbeddedBus(tmp_path / "bus.sqlite3", fast_oona_settings())
    bus.close()
    with pytest.raises(BusError, match="closed"):
        bus.publish(STREAM, signal_envelope("x"))


def test_a_writer_holding_the_lock_past_the_busy_timeout_makes_the_bus_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "bus.sqlite3"
    bus = EmbeddedBus(path, fast_oona_settings(busy_timeout_ms=50))
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(BusError) as caught:
            bus.publish(STREAM, signal_envelope("x"))
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert type(caught.value).__name__ == "BusUnavailable"
    bus.publish(STREAM, signal_envelope("after"))
    bus.close()


def test_a_bus_file_of_the_first_contract_is_refused_not_misread(tmp_path: Path) -> None:
    path = tmp_path / "bus.sqlite3"
    bus = EmbeddedBus(path, fast_oona_settings())
    bus.close()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("DROP TABLE leyline_contract")  # as written before the contract version was recorded
    db.close()
    with pytest.raises(ContractVersionMismatch) as info:
        EmbeddedBus(path, fast_oona_settings())
    assert (info.value.found, info.value.expected) == (1, CONTRACT_VERSION)
