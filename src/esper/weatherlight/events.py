"""What the supervisor reports: one table of events, each with a reason, and their telemetry form.

`EVENTS` is the only place an event's level and priority are decided. Every event is logged at its level;
sinks (the CLI's printer, `BusEventPublisher`) receive it as well. A give-up is HIGH priority, so Oona
routes it to the emergency stream where every listener sees it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from esper.leyline import SYSTEM_CLOCK, Clock, EsperError, pb
from esper.leyline.events import LOG_LEVELS, EventSink, EventSpec
from esper.oona import Bus, TelemetryPublisher

_log = logging.getLogger("esper.weatherlight")


EVENTS: dict[str, EventSpec] = {
    "supervisor_started": EventSpec(pb.TELEMETRY_LEVEL_INFO, pb.MESSAGE_PRIORITY_NORMAL),
    "supervisor_stopping": EventSpec(pb.TELEMETRY_LEVEL_INFO, pb.MESSAGE_PRIORITY_NORMAL),
    "supervisor_stopped": EventSpec(pb.TELEMETRY_LEVEL_INFO, pb.MESSAGE_PRIORITY_NORMAL),
    "emergency_halt": EventSpec(pb.TELEMETRY_LEVEL_CRITICAL, pb.MESSAGE_PRIORITY_NORMAL),
    "emergency_channel_unreadable": EventSpec(pb.TELEMETRY_LEVEL_WARNING, pb.MESSAGE_PRIORITY_NORMAL),
    "service_started": EventSpec(pb.TELEMETRY_LEVEL_INFO, pb.MESSAGE_PRIORITY_NORMAL),
    "service_start_failed": EventSpec(pb.TELEMETRY_LEVEL_ERROR, pb.MESSAGE_PRIORITY_NORMAL),
    "service_exited": EventSpec(pb.TELEMETRY_LEVEL_WARNING, pb.MESSAGE_PRIORITY_NORMAL),
    # Exit status 0 (an actor that completed its episodes): done, not a fault.
    "service_finished": EventSpec(pb.TELEMETRY_LEVEL_INFO, pb.MESSAGE_PRIORITY_NORMAL),
    "service_restart_scheduled": EventSpec(pb.TELEMETRY_LEVEL_WARNING, pb.MESSAGE_PRIORITY_NORMAL),
    "service_given_up": EventSpec(pb.TELEMETRY_LEVEL_ERROR, pb.MESSAGE_PRIORITY_HIGH),
    "service_stopping": EventSpec(pb.TELEMETRY_LEVEL_INFO, pb.MESSAGE_PRIORITY_NORMAL),
    "service_killed": EventSpec(pb.TELEMETRY_LEVEL_WARNING, pb.MESSAGE_PRIORITY_NORMAL),
    "service_stopped": EventSpec(pb.TELEMETRY_LEVEL_INFO, pb.MESSAGE_PRIORITY_NORMAL),
}


class UnknownSupervisorEvent(EsperError):
    """An event name that is not in `EVENTS` (every event must have a level and a priority)."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"weatherlight event {name!r} is not declared in EVENTS")


@dataclass(frozen=True)
class SupervisorEvent:
    """Something that happened to a service (or to the supervisor, when `service` is empty), and why."""

    name: str
    service: str
    reason: str
    wall_ns: int
    attributes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in EVENTS:
            raise UnknownSupervisorEvent(self.name)

    @property
    def level(self) -> int:
        """The event's telemetry level, from `EVENTS`."""
        return EVENTS[self.name].level

    def log(self) -> None:
        """Log the event at its level."""
        who = self.service or "supervisor"
        _log.log(LOG_LEVELS[self.level], "%s %s: %s %s", who, self.name, self.reason, self.attributes or "")


SupervisorEventSink = Callable[[SupervisorEvent], None]
"""Receives every event of a supervisor as its typed record, on the supervisor's thread (the record
carries its time and service, which the bus packet and the terminal line show; an `esper.leyline`
`EventSink` receives the same event as name, reason and attributes through `to_sink`)."""


def to_sink(sink: EventSink) -> SupervisorEventSink:
    """`sink`, fed each supervisor event as (name, reason, service=..., **attributes)."""

    def forward(event: SupervisorEvent) -> None:
        service = {"service": event.service} if event.service else {}
        sink(event.name, event.reason, **service, **event.attributes)

    return forward


def telemetry_packet(event: SupervisorEvent) -> pb.TelemetryPacket:
    """`event` as a one-event telemetry packet from subsystem `weatherlight`."""
    spec = EVENTS[event.name]
    packet = pb.TelemetryPacket(
        packet_id=f"tel-{uuid.uuid4().hex}",
        source_subsystem="weatherlight",
        level=spec.level,
        priority=spec.priority,
    )
    packet.timestamp.FromNanoseconds(event.wall_ns)
    item = packet.events.add(name=event.name, description=event.reason, level=spec.level)
    item.attributes.update(event.attributes)
    if event.service:
        item.attributes["service"] = event.service
    return packet


class BusEventPublisher:
    """A `SupervisorEventSink` that publishes each event as telemetry on the bus (urgent ones on the emergency
    stream) through Oona's `TelemetryPublisher`: a bus that cannot take the packet does not stop the
    supervisor (the failure is logged with its reason and counted in `failures`)."""

    def __init__(self, bus: Bus, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self._publisher = TelemetryPublisher(bus, clock=clock)

    @property
    def failures(self) -> int:
        """Events the bus refused."""
        return self._publisher.failures

    def __call__(self, event: SupervisorEvent) -> None:
        self._publisher(telemetry_packet(event))
