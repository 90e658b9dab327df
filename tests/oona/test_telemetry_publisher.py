"""`TelemetryPublisher`: packets routed by priority; a bus that refuses one does not stop the caller."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from esper.leyline import pb
from esper.oona import BusUnavailable, EmbeddedBus, OonaSettings, Streams, TelemetryPublisher, open_envelope


def packet(priority: int) -> pb.TelemetryPacket:
    return pb.TelemetryPacket(packet_id=f"tel-{priority}", source_subsystem="tamiyo", priority=priority)


def test_packets_go_to_the_stream_their_priority_selects(tmp_path: Path) -> None:
    bus = EmbeddedBus(tmp_path / "bus.sqlite3", OonaSettings())
    try:
        publish = TelemetryPublisher(bus)
        publish(packet(pb.MESSAGE_PRIORITY_NORMAL))
        publish(packet(pb.MESSAGE_PRIORITY_CRITICAL))
        received = {}
        for stream in (Streams.TELEMETRY, Streams.EMERGENCY):
            bus.ensure_group(stream, "test")
            received[stream] = [
                open_envelope(d.envelope, pb.TelemetryPacket).packet_id
                for d in bus.consume(stream, "test", "t", count=10)
            ]
    finally:
        bus.close()
    assert received == {Streams.TELEMETRY: ["tel-2"], Streams.EMERGENCY: ["tel-4"]}
    assert publish.failures == 0


class RefusingBus:
    def publish(self, stream: str, envelope: pb.BusEnvelope) -> str:
        raise BusUnavailable("publish", "test bus", 3, "connection refused")


def test_a_refused_packet_is_logged_and_counted_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    publish = TelemetryPublisher(RefusingBus())  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="esper.oona.telemetry"):
        publish(packet(pb.MESSAGE_PRIORITY_HIGH))
    assert publish.failures == 1 and isinstance(publish.last_error, BusUnavailable)
    assert "tel-3 from tamiyo not published" in caplog.text and "connection refused" in caplog.text
