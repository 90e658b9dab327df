"""What every subsystem's event table is made of: an event's level and priority, and the logging level a
telemetry level is logged at."""

from __future__ import annotations

import logging
from dataclasses import dataclass

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
