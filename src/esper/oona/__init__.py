"""Oona: the message bus (streams, consumer groups, ack, reclaim, dead-letter, priority routing).

`open_bus(esper_settings, oona_settings)` returns the deployment's bus: the embedded SQLite backend by
default, Redis Streams for a `redis://` URL. Messages travel in envelopes (`envelope_for`,
`open_envelope`); telemetry is routed by priority (`publish_telemetry`); emergencies are broadcast to
every process (`EmergencyBroadcaster` signs, `EmergencyListener` verifies; a process starts listening
with `open_emergency_listener`).
"""

from esper.oona.bus import (
    Bus,
    BusError,
    BusUnavailable,
    Delivery,
    GroupNotFound,
    GroupStats,
    InvalidMessageId,
    PayloadTooLarge,
    Streams,
    StreamStats,
)
from esper.oona.embedded import EmbeddedBus
from esper.oona.emergency import (
    EmergencyBroadcaster,
    EmergencyHandlerFailed,
    EmergencyListener,
    emergency_verifier,
    open_emergency_listener,
)
from esper.oona.envelopes import UnexpectedMessageType, envelope_for, open_envelope
from esper.oona.factory import open_bus
from esper.oona.redis_streams import RedisBus
from esper.oona.settings import OonaSettings
from esper.oona.telemetry import TelemetryPublisher, publish_telemetry, telemetry_stream

__all__ = [
    "Bus",
    "BusError",
    "BusUnavailable",
    "Delivery",
    "EmbeddedBus",
    "EmergencyBroadcaster",
    "EmergencyHandlerFailed",
    "EmergencyListener",
    "GroupNotFound",
    "GroupStats",
    "InvalidMessageId",
    "OonaSettings",
    "PayloadTooLarge",
    "RedisBus",
    "StreamStats",
    "Streams",
    "TelemetryPublisher",
    "UnexpectedMessageType",
    "emergency_verifier",
    "envelope_for",
    "open_bus",
    "open_emergency_listener",
    "open_envelope",
    "publish_telemetry",
    "telemetry_stream",
]
