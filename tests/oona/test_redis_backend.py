"""What only the Redis backend has to show: retries while Redis is down, and foreign entries on a stream."""

from __future__ import annotations

import time
from collections import Counter, deque

import pytest
import redis

from esper.leyline import EsperSettings, load_settings, pb
from esper.oona import Bus, BusUnavailable, GroupNotFound, RedisBus, Streams, envelope_for, open_envelope
from esper.oona.bus import DEAD_LETTER_REASON
from esper.oona.local_redis import LocalRedisServer, free_loopback_port
from tests.conftest import fast_oona_settings

pytestmark = pytest.mark.redis

GROUP = "simic"


def field_report(number: int) -> pb.FieldReport:
    report = pb.FieldReport(
        report_id=f"report-{number}",
        command_id=f"command-{number}",
        training_run_id="run",
        outcome=pb.FIELD_REPORT_OUTCOME_NEUTRAL,
        observation_window_epochs=1,
    )
    report.issued_at.FromNanoseconds(time.time_ns())
    return report


class ConfirmingOutbox:
    """A stand-in for Tamiyo's field-report outbox, with end-to-end confirmation.

    A report leaves `queue` only when XADD succeeded; a publish that raises `BusUnavailable` leaves it at
    the head of the queue for the next flush. A published report stays in `unconfirmed` until the
    consumer's ack is observed, and after an outage every unconfirmed report is queued again, because a
    Redis without persistence comes back empty.
    """

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.queue: deque[pb.FieldReport] = deque()
        self.unconfirmed: dict[str, pb.FieldReport] = {}
        self.failures = 0
        self.resent = 0
        self._outage = False

    def flush(self) -> None:
        while self.queue:
            report = self.queue[0]
            try:
                self.bus.publish(Streams.FIELD_REPORTS, envelope_for(report))
            except BusUnavailable:
                self.failures += 1
                self._outage = True
                return
            self.queue.popleft()
            if self._outage:
                self._outage = False
                self._requeue_unconfirmed()
            self.unconfirmed[report.report_id] = report

    def _requeue_unconfirmed(self) -> None:
        queued = {report.report_id for report in self.queue}
        lost = [r for rid, r in self.unconfirmed.items() if rid not in queued]
        self.resent += len(lost)
        self.queue.extend(lost)
        self.unconfirmed.clear()

    def confirm(self, report_ids: list[str]) -> None:
        for report_id in report_ids:
            self.unconfirmed.pop(report_id, None)


class AckingConsumer:
    """Simic's side: consume, ack, and record each report id once its ack succeeded."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.acked: list[str] = []
        self.failures = 0
        bus.ensure_group(Streams.FIELD_REPORTS, GROUP)

    def take(self, count: int) -> list[str]:
        try:
            deliveries = self.bus.consume(Streams.FIELD_REPORTS, GROUP, "simic-1", count=count)
            self.bus.ack(Streams.FIELD_REPORTS, GROUP, [d.message_id for d in deliveries])
        except GroupNotFound:
            self.bus.ensure_group(Streams.FIELD_REPORTS, GROUP)  # Redis restarted empty
            return []
        except BusUnavailable:
            self.failures += 1
            return []
        ids = [open_envelope(d.envelope, pb.FieldReport).report_id for d in deliveries]
        self.acked += ids
        return ids


def test_field_reports_survive_a_redis_crash_and_restart(private_redis: LocalRedisServer) -> None:
    """Kill -9 Redis in the middle of a stream of field reports, restart it on the same port.

    Guarantee shown: every report is acked by the consumer exactly once in the end. How: a publish that
    raises `BusUnavailable` (after the backoff schedule) leaves the report in the producer's queue. Redis
    runs without persistence, so the reports it held unconsumed at the kill die with it; the producer
    therefore keeps each published report until the consumer's ack is observed and re-sends the
    unconfirmed ones when publishing works again. With a persistent Redis (AOF, appendfsync always)
    only the first half is needed: what XADD accepted is still there after the restart.
    """
    esper = load_settings(EsperSettings, environ={}, bus_url=private_redis.url)
    oona = fast_oona_settings()
    producer_bus, consumer_bus = RedisBus(esper.bus_url, oona), RedisBus(esper.bus_url, oona)
    outbox, consumer = ConfirmingOutbox(producer_bus), AckingConsumer(consumer_bus)
    total = 60
    try:
        for number in range(total):
            outbox.queue.append(field_report(number))
            outbox.flush()
            if number % 3 == 0:
                outbox.confirm(consumer.take(2))  # the consumer lags: a backlog sits in Redis
            if number == 30:
                backlog = producer_bus.stats()[0].length - len(consumer.acked)
                assert backlog > 0
                private_redis.kill()
            if number == 40:
                private_redis.start()
        for _ in range(200):
            if len(consumer.acked) >= total and not outbox.queue:
                break
            outbox.flush()
            outbox.confirm(consumer.take(10))
    finally:
        producer_bus.close()
        consumer_bus.close()
    assert outbox.failures > 0 and consumer.failures > 0, "the outage was not observed"
    assert outbox.resent > 0, "nothing was lost with Redis, so re-sending was not exercised"
    counts = Counter(consumer.acked)
    assert set(counts) == {f"report-{n}" for n in range(total)}
    assert max(counts.values()) == 1
    assert not outbox.queue and not outbox.unconfirmed


def test_publish_to_an_unreachable_redis_raises_after_the_retry_limit() -> None:
    bus = RedisBus(f"redis://127.0.0.1:{free_loopback_port()}/0", fast_oona_settings(retry_limit=2))
    try:
        with pytest.raises(BusUnavailable) as caught:
            bus.publish(Streams.TELEMETRY, envelope_for(pb.TelemetryPacket(packet_id="t")))
    finally:
        bus.close()
    assert caught.value.attempts == 3
    assert caught.value.operation == f"publish to {Streams.TELEMETRY}"


def test_entries_that_hold_no_envelope_are_dead_lettered_and_the_stream_keeps_working(
    redis_server: LocalRedisServer,
) -> None:
    stream = f"foreign.{time.time_ns()}"
    raw = redis.Redis.from_url(redis_server.url)
    bus = RedisBus(redis_server.url, fast_oona_settings())
    try:
        bus.ensure_group(stream, "g")
        raw.xadd(stream, {b"e": b"\xff\xfe not protobuf"})
        raw.xadd(stream, {b"other": b"field"})
        good = bus.publish(stream, envelope_for(pb.TelemetryPacket(packet_id="fine")))
        assert [d.message_id for d in bus.consume(stream, "g", "c", count=10)] == [good]
        (stats,) = [s for s in bus.stats() if s.stream == stream]
        assert stats.dead_letters == 2
        assert [(g.name, g.pending) for g in stats.groups] == [("g", 1)]
        bus.ensure_group(Streams.dead_letter(stream), "inspect")
        dead = bus.consume(Streams.dead_letter(stream), "inspect", "c", count=10)
        assert dead[0].envelope.payload == b"\xff\xfe not protobuf"
        assert all("undecodable envelope" in d.envelope.attributes[DEAD_LETTER_REASON] for d in dead)
    finally:
        bus.close()
        raw.close()
