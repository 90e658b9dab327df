"""Weatherlight's events reach the one `EventSink` shape of `esper.leyline`."""

from __future__ import annotations


def test_a_supervisor_event_reaches_any_leyline_event_sink() -> None:
    """The one `EventSink` shape (Nissa's event log, Tamiyo's telemetry) can take Weatherlight's events."""
    from esper.leyline import EventSink
    from esper.weatherlight.events import SupervisorEvent, to_sink

    seen: list[tuple[str, str, dict[str, str]]] = []

    def sink(name: str, description: str, /, **attributes: str) -> None:
        seen.append((name, description, attributes))

    any_sink: EventSink = sink
    forward = to_sink(any_sink)
    forward(SupervisorEvent("service_given_up", "simic", "5 restarts in 60 s", 1, {"restarts": "5"}))
    forward(SupervisorEvent("supervisor_stopped", "", "SIGTERM", 2))
    assert seen == [
        ("service_given_up", "5 restarts in 60 s", {"service": "simic", "restarts": "5"}),
        ("supervisor_stopped", "SIGTERM", {}),
    ]
