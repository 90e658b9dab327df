"""What every subsystem's event table is made of: an event's level and priority, the logging level a
telemetry level is logged at, and the one `EventSink` every emitter of events writes to."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from esper.leyline import leyline_pb2 as pb


@dataclass(frozen=True)
class EventSpec:
    """Level (`pb.TelemetryLevel`) and bus priority (`pb.MessagePriority`) of one event."""

    level: int
    priority: int


LOG_LEVELS: dict[int, int] = {
    pb.TELEMETRY_LEVEL_DEBUG: logging.DEBUG,
    pb.TELEMETRY_LEVEL_INFO: logging.INFO,
    pb.TELEMETRY_LEVEL_WARNING: logging.WARNING,
    pb.TELEMETRY_LEVEL_ERROR: logging.ERROR,
    pb.TELEMETRY_LEVEL_CRITICAL: logging.CRITICAL,
}


class EventSink(Protocol):
    """Receives events: a name from the emitter's event table, what happened, and string attributes.

    The one shape of an event sink in Esper: Tamiyo's telemetry, Nissa's event log and a logger each
    implement it, so any emitter can be pointed at any of them."""

    def __call__(self, name: str, description: str, /, **attributes: str) -> object:
        """Record event `name`."""
        ...
