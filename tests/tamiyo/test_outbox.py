"""The outbox: publication with exponential backoff on a manual clock, drop past the limit, metrics."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from esper.leyline import ManualClock, load_settings, pb
from esper.oona import BusUnavailable, EmbeddedBus, OonaSettings, PayloadTooLarge, Streams, open_envelope
from esper.tamiyo.records.outbox import FieldReportOutbox, OutboxMetrics, OutboxPublisher
from esper.tamiyo.records.store import TamiyoStore
from esper.tamiyo.settings import TamiyoSettings
from tests.tamiyo.test_store import decision, report


class FlakyBus:
    """An embedded bus whose next `failures` publishes fail as if the backend were down."""

    def __init__(self, inner: EmbeddedBus, failures: int = 0, error: Exception | None = None) -> None:
        self.inner = inner
        self.failures = failures
        self.error = error
        self.calls = 0

    def publish_many(self, stream: str, envelopes: list[pb.BusEnvelope]) -> list[str]:
        self.calls += 1
        if self.failures > 0:
            self.failures -= 1
            raise self.error or BusUnavailable("publish", "flaky", 1, "connection refused")
        return self.inner.publish_many(stream, envelopes)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


Events = list[tuple[str, str, dict[str, str]]]


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[tuple[TamiyoStore, EmbeddedBus, ManualClock]]:
    clock = ManualClock()
    store = TamiyoStore(tmp_path / "tamiyo.sqlite3", clock=clock)
    bus = EmbeddedBus(tmp_path / "bus.sqlite3", load_settings(OonaSettings, environ={}))
    yield store, bus, clock
    store.close()
    bus.close()


def make_outbox(
    store: TamiyoStore, bus: object, clock: ManualClock, events: Events, **overrides: object
) -> tuple[FieldReportOutbox, CollectorRegistry]:
    values: dict[str, object] = {
        "fr_retry_backoff_ms": 100.0,
        "fr_retry_backoff_mult": 2.0,
        "fr_retry_jitter": 0.0,
    }
    values.update(overrides)
    settings = TamiyoSettings(**values)  # type: ignore[arg-type]
    registry = CollectorRegistry()

    def sink(name: str, description: str, attributes: Mapping[str, str]) -> None:
        events.append((name, description, dict(attributes)))

    outbox = FieldReportOutbox(
        store, bus, settings, clock, metrics=OutboxMetrics(registry), events=sink, rng=random.Random(0)
    )
    return outbox, registry


def metric(registry: CollectorRegistry, name: str) -> float:
    value = registry.get_sample_value(f"tamiyo_field_reports_{name}_total")
    assert value is not None
    return value


def consume(bus: EmbeddedBus, stream: str) -> list[pb.BusEnvelope]:
    bus.ensure_group(stream, "test")
    return [d.envelope for d in bus.consume(stream, "test", "c", count=100)]


def test_reports_and_decisions_reach_their_streams(
    parts: tuple[TamiyoStore, EmbeddedBus, ManualClock],
) -> None:
    store, bus, clock = parts
    events: Events = []
    store.record_decision(decision("cmd-1"), None)
    store.add_field_report(report("fr-synth-1"))
    outbox, registry = make_outbox(store, bus, clock, events)
    assert metric(registry, "pending") == 1
    result = outbox.pump()
    assert (result.published, result.retried, result.dropped) == (2, 0, 0)
    reports = [open_envelope(e, pb.FieldReport) for e in consume(bus, Streams.FIELD_REPORTS)]
    decisions = [pb.DecisionRecord.FromString(e.payload) for e in consume(bus, Streams.DECISIONS)]
    assert [r.report_id for r in reports] == ["fr-synth-1"]
    assert [d.command_id for d in decisions] == ["cmd-1"]
    assert metric(registry, "published") == 1 and metric(registry, "pending") == 0
    assert store.outbox_counts() == {"pending": 0, "published": 1, "dropped": 0}
    assert outbox.pump().attempted == 0  # published entries are never sent again
    assert events == []


def test_retry_follows_exponential_backoff_on_the_clock(
    parts: tuple[TamiyoStore, EmbeddedBus, ManualClock],
) -> None:
    store, inner, clock = parts
    bus = FlakyBus(inner, failures=2)
    events: Events = []
    store.add_field_report(report("fr-synth-r"))
    outbox, registry = make_outbox(store, bus, clock, events, fr_retry_limit=5)
    assert outbox.pump().retried == 1
    assert [name for name, _, _ in events] == ["field_report_retry"]
    assert events[0][2]["delay_ms"] == "100.0"
    clock.advance(0.099)
    assert outbox.pump().attempted == 0  # not due yet: no bus call
    assert bus.calls == 1
    clock.advance(0.001)
    assert outbox.pump().retried == 1
    assert events[1][2]["delay_ms"] == "200.0"  # base x mult
    clock.advance(0.199)
    assert outbox.pump().attempted == 0
    clock.advance(0.001)
    assert outbox.pump().published == 1
    assert metric(registry, "retries") == 2 and metric(registry, "published") == 1
    stored = store.field_report("fr-synth-r")
    assert stored is not None and stored.status == "published" and stored.attempts == 3


def test_past_the_limit_a_report_is_dropped_with_an_event_and_stays_queryable(
    parts: tuple[TamiyoStore, EmbeddedBus, ManualClock],
) -> None:
    store, inner, clock = parts
    bus = FlakyBus(inner, failures=100)
    events: Events = []
    store.add_field_report(report("fr-synth-d"))
    outbox, registry = make_outbox(store, bus, clock, events, fr_retry_limit=2)
    for _ in range(10):
        outbox.pump()
        clock.advance(10.0)
    assert bus.calls == 3  # the first attempt and two retries, then never again
    names = [name for name, _, _ in events]
    assert names == ["field_report_retry", "field_report_retry", "field_report_drop"]
    assert "retry limit 2" in events[-1][2]["reason"]
    stored = store.field_report("fr-synth-d")
    assert stored is not None and stored.status == "dropped" and "connection refused" in stored.last_error
    assert metric(registry, "dropped") == 1 and metric(registry, "pending") == 0
    bus.failures = 0
    clock.advance(1000.0)
    assert outbox.pump().attempted == 0


def test_jitter_spreads_the_delay_within_bounds(parts: tuple[TamiyoStore, EmbeddedBus, ManualClock]) -> None:
    store, inner, clock = parts
    events: Events = []
    store.add_field_reports([report(f"fr-synth-{i}") for i in range(20)])
    outbox, _ = make_outbox(store, FlakyBus(inner, failures=1), clock, events, fr_retry_jitter=0.5)
    outbox.pump()
    delays = {float(attributes["delay_ms"]) for _, _, attributes in events}
    assert len(delays) > 1 and all(50.0 <= d <= 150.0 for d in delays)


def test_a_message_too_large_for_the_bus_is_dropped_at_once(
    parts: tuple[TamiyoStore, EmbeddedBus, ManualClock],
) -> None:
    store, inner, clock = parts
    bus = FlakyBus(inner, failures=1, error=PayloadTooLarge(Streams.FIELD_REPORTS, 10, 5))
    events: Events = []
    store.add_field_report(report("fr-synth-big"))
    outbox, _ = make_outbox(store, bus, clock, events)
    assert outbox.pump().dropped == 1
    assert [name for name, _, _ in events] == ["field_report_drop"]


def test_pending_entries_survive_a_restart_and_publish_later(tmp_path: Path) -> None:
    clock = ManualClock()
    path = tmp_path / "tamiyo.sqlite3"
    bus = EmbeddedBus(tmp_path / "bus.sqlite3", load_settings(OonaSettings, environ={}))
    with TamiyoStore(path, clock=clock) as store:
        store.add_field_report(report("fr-synth-p"))
        outbox, _ = make_outbox(store, FlakyBus(bus, failures=1), clock, [])
        outbox.pump()
    clock.advance(1.0)
    with TamiyoStore(path, clock=clock) as store:
        outbox, registry = make_outbox(store, bus, clock, [])
        assert metric(registry, "pending") == 1
        assert outbox.pump().published == 1
    assert [open_envelope(e, pb.FieldReport).report_id for e in consume(bus, Streams.FIELD_REPORTS)] == [
        "fr-synth-p"
    ]
    bus.close()


def test_publisher_thread_publishes_without_the_caller_waiting(
    parts: tuple[TamiyoStore, EmbeddedBus, ManualClock],
) -> None:
    store, bus, clock = parts
    events: Events = []
    outbox, _ = make_outbox(store, bus, clock, events)
    lock = threading.Lock()

    def sink(name: str, description: str, attributes: Mapping[str, str]) -> None:
        with lock:
            events.append((name, description, dict(attributes)))

    publisher = OutboxPublisher(outbox, sink, poll_s=0.01)
    try:
        store.add_field_report(report("fr-synth-t"))
        publisher.notify()
        deadline = time.monotonic() + 5
        while store.outbox_counts()["published"] == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert store.outbox_counts()["published"] == 1
    finally:
        publisher.close()
    assert events == []


class SignallingBus(FlakyBus):
    """A `FlakyBus` that says when a publish got through."""

    def __init__(self, inner: EmbeddedBus, failures: int, error: Exception) -> None:
        super().__init__(inner, failures, error)
        self.published = threading.Event()

    def publish_many(self, stream: str, envelopes: list[pb.BusEnvelope]) -> list[str]:
        ids = super().publish_many(stream, envelopes)
        self.published.set()
        return ids


def test_publisher_thread_survives_an_unexpected_error_reports_it_and_publishes_later(
    parts: tuple[TamiyoStore, EmbeddedBus, ManualClock],
) -> None:
    store, inner, clock = parts
    bus = SignallingBus(inner, failures=1, error=RuntimeError("client library bug"))
    events: Events = []
    outbox, registry = make_outbox(store, bus, clock, events)
    failed = threading.Event()

    def sink(name: str, description: str, attributes: Mapping[str, str]) -> None:
        events.append((name, description, dict(attributes)))
        if name == "field_report_outbox_failed":
            failed.set()

    store.add_field_report(report("fr-synth-e"))
    # A long poll: only `notify` wakes the thread, so the second pass is the one the test asks for.
    publisher = OutboxPublisher(outbox, sink, poll_s=60.0)
    try:
        assert failed.wait(10), "the failed pass was not reported"
        ((name, description, attributes),) = events
        assert name == "field_report_outbox_failed" and "client library bug" in attributes["error"]
        assert "unexpected" in description
        assert registry.get_sample_value("tamiyo_field_reports_outbox_failures_total") == 1.0
        assert store.outbox_counts()["pending"] == 1  # nothing lost
        publisher.notify()
        assert bus.published.wait(10), "the publisher thread died"
    finally:
        publisher.close()
    assert store.outbox_counts()["published"] == 1
