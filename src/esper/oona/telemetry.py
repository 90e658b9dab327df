"""Publishing telemetry: HIGH and CRITICAL packets go to the emergency stream, the rest to telemetry."""

from __future__ import annotations

import logging

from esper.leyline import SYSTEM_CLOCK, Clock, pb
from esper.oona.bus import Bus, BusError, Streams
from esper.oona.envelopes import envelope_for

_log = logging.getLogger("esper.oona.telemetry")

URGENT_PRIORITIES = frozenset({pb.MESSAGE_PRIORITY_HIGH, pb.MESSAGE_PRIORITY_CRITICAL})


def telemetry_stream(packet: pb.TelemetryPacket) -> str:
    """The stream a telemetry packet belongs on, by its `priority`."""
    return Streams.EMERGENCY if packet.priority in URGENT_PRIORITIES else Streams.TELEMETRY


def publish_telemetry(
    bus: Bus, packet: pb.TelemetryPacket, *, trace_id: str = "", clock: Clock = SYSTEM_CLOCK
) -> tuple[str, str]:
    """Publish `packet` on the stream its priority selects; returns (stream, message id).

    The envelope carries the packet's priority, so consumers of the emergency stream can tell urgent
    telemetry from emergency signals by envelope type and priority alike.
    """
    stream = telemetry_stream(packet)
    priority = packet.priority or pb.MESSAGE_PRIORITY_NORMAL
    envelope = envelope_for(packet, priority, trace_id=trace_id, clock=clock)
    return stream, bus.publish(stream, envelope)


class TelemetryPublisher:
    """A telemetry sink that publishes each packet with `publish_telemetry` and never stops its caller.

    Telemetry describes work that already happened (a decision, a restart): a bus that refuses the
    packet does not undo it. The refusal is logged as an error with its reason and counted in `failures`
    (`last_error` keeps the latest); the packet's events were logged by their producer already.
    """

    def __init__(self, bus: Bus, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self._bus = bus
        self._clock = clock
        self.failures = 0
        self.last_error: BusError | None = None

    def __call__(self, packet: pb.TelemetryPacket) -> None:
        try:
            publish_telemetry(self._bus, packet, clock=self._clock)
        except BusError as exc:
            self.failures += 1
            self.last_error = exc
            _log.error(
                "telemetry packet %s from %s not published on the bus: %s",
                packet.packet_id,
                packet.source_subsystem or "?",
                exc,
            )
