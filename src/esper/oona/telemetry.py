"""Publishing telemetry: HIGH and CRITICAL packets go to the emergency stream, the rest to telemetry."""

from __future__ import annotations

from esper.leyline import SYSTEM_CLOCK, Clock, pb
from esper.oona.bus import Bus, Streams
from esper.oona.envelopes import envelope_for

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
