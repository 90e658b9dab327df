"""The one conformance suite of the bus: every test runs unchanged against both backends.

`make_bus` and `bus_spec` (tests/conftest.py) give a fresh bus of each backend in turn; processes are
started with `spawn` and open the same bus from its spec.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esper.leyline import MalformedMessage, pb
from esper.oona import (
    Bus,
    Delivery,
    GroupNotFound,
    PayloadTooLarge,
    Streams,
    UnexpectedMessageType,
    envelope_for,
    open_envelope,
)
from esper.oona.bus import DEAD_LETTER_DELIVERIES, DEAD_LETTER_GROUP, DEAD_LETTER_SOURCE_ID
from tests.conftest import BusSpec
from tests.oona import workers
from tests.oona.workers import key_of, numbered_envelope

MakeBus = Callable[..., Bus]
STREAM = "test.stream"
SPAWN = multiprocessing.get_context("spawn")


def publish_numbered(bus: Bus, total: int, producer: str = "p") -> list[str]:
    return [bus.publish(STREAM, numbered_envelope(producer, n)) for n in range(total)]


def ids(deliveries: list[Delivery]) -> list[str]:
    return [d.message_id for d in deliveries]


def drain(bus: Bus, group: str, consumer: str = "c") -> list[str]:
    """Consume everything new for `group`, acking nothing; return the keys in delivery order."""
    keys: list[str] = []
    while batch := bus.consume(STREAM, group, consumer, count=50):
        keys += [key_of(d.envelope) for d in batch]
    return keys


# -- ordering, groups, ack -------------------------------------------------------------------------------


def test_consume_delivers_in_publish_order_with_increasing_ids(make_bus: MakeBus) -> None:
    bus = make_bus()
    published = publish_numbered(bus, 5) + bus.publish_many(
        STREAM, [numbered_envelope("p", n) for n in range(5, 12)]
    )
    bus.ensure_group(STREAM, "g")
    deliveries = bus.consume(STREAM, "g", "c", count=5) + bus.consume(STREAM, "g", "c", count=50)
    assert [d.message_id for d in deliveries] == published
    assert [key_of(d.envelope) for d in deliveries] == [f"p:{n}" for n in range(12)]
    assert all(d.delivery_count == 1 and d.stream == STREAM for d in deliveries)
    assert bus.consume(STREAM, "g", "c") == []


def test_envelope_round_trips_unchanged(make_bus: MakeBus) -> None:
    bus = make_bus()
    report = pb.FieldReport(
        report_id="r1",
        command_id="c1",
        training_run_id="run",
        seed_id="s",
        outcome=pb.FIELD_REPORT_OUTCOME_SUCCESS,
        observation_window_epochs=3,
    )
    report.issued_at.FromNanoseconds(1_700_000_000_000_000_000)
    envelope = envelope_for(report, pb.MESSAGE_PRIORITY_HIGH, trace_id="trace-1", attributes={"k": "v"})
    bus.publish(Streams.FIELD_REPORTS, envelope)
    bus.ensure_group(Streams.FIELD_REPORTS, "simic")
    (delivery,) = bus.consume(Streams.FIELD_REPORTS, "simic", "c")
    assert delivery.envelope == envelope
    assert open_envelope(delivery.envelope, pb.FieldReport) == report


def test_acked_messages_are_never_redelivered(make_bus: MakeBus) -> None:
    bus = make_bus()
    publish_numbered(bus, 3)
    bus.ensure_group(STREAM, "g")
    deliveries = bus.consume(STREAM, "g", "c", count=3)
    assert bus.ack(STREAM, "g", ids(deliveries)) == 3
    assert bus.ack(STREAM, "g", ids(deliveries)) == 0
    assert bus.reclaim(STREAM, "g", "other", min_idle_ms=0, count=100) == []
    assert bus.consume(STREAM, "g", "other", count=10) == []


def test_unacked_messages_are_reclaimed_by_another_consumer(make_bus: MakeBus) -> None:
    bus = make_bus()
    published = publish_numbered(bus, 4)
    bus.ensure_group(STREAM, "g")
    first = bus.consume(STREAM, "g", "c1", count=4)
    bus.ack(STREAM, "g", [first[1].message_id])
    reclaimed = bus.reclaim(STREAM, "g", "c2", min_idle_ms=0, count=100)
    assert ids(reclaimed) == [published[0], published[2], published[3]]
    assert [d.delivery_count for d in reclaimed] == [2, 2, 2]
    assert bus.ack(STREAM, "g", ids(reclaimed)) == 3
    assert bus.reclaim(STREAM, "g", "c3", min_idle_ms=0) == []


def test_recently_delivered_messages_are_not_reclaimed_before_the_idle_timeout(make_bus: MakeBus) -> None:
    bus = make_bus()
    publish_numbered(bus, 2)
    bus.ensure_group(STREAM, "g")
    held = bus.consume(STREAM, "g", "c1", count=2)
    assert bus.reclaim(STREAM, "g", "c2", min_idle_ms=60_000) == []
    time.sleep(0.06)
    assert ids(bus.reclaim(STREAM, "g", "c2", min_idle_ms=50)) == ids(held)


def test_groups_are_independent(make_bus: MakeBus) -> None:
    bus = make_bus()
    published = publish_numbered(bus, 3)
    bus.ensure_group(STREAM, "a")
    bus.ensure_group(STREAM, "b")
    in_a = bus.consume(STREAM, "a", "c", count=10)
    bus.ack(STREAM, "a", ids(in_a))
    assert ids(bus.consume(STREAM, "b", "c", count=1)) == published[:1]
    assert ids(bus.consume(STREAM, "b", "c", count=10)) == published[1:]
    assert ids(bus.reclaim(STREAM, "b", "c", min_idle_ms=0, count=10)) == published
    assert bus.reclaim(STREAM, "a", "c", min_idle_ms=0, count=10) == []


def test_ensure_group_is_idempotent_and_can_start_at_the_end(make_bus: MakeBus) -> None:
    bus = make_bus()
    publish_numbered(bus, 2)
    bus.ensure_group(STREAM, "old")
    bus.ensure_group(STREAM, "new", from_beginning=False)
    late = bus.publish(STREAM, numbered_envelope("p", 2))
    assert len(bus.consume(STREAM, "old", "c", count=1)) == 1
    bus.ensure_group(STREAM, "old")  # must not reset the group's position
    assert len(bus.consume(STREAM, "old", "c", count=10)) == 2
    assert ids(bus.consume(STREAM, "new", "c", count=10)) == [late]


def test_an_unknown_or_deleted_group_is_a_typed_error(make_bus: MakeBus) -> None:
    bus = make_bus()
    publish_numbered(bus, 1)
    with pytest.raises(GroupNotFound) as caught:
        bus.consume(STREAM, "nobody", "c")
    assert (caught.value.stream, caught.value.group) == (STREAM, "nobody")
    bus.ensure_group(STREAM, "g")
    bus.consume(STREAM, "g", "c")
    bus.delete_group(STREAM, "g")
    bus.delete_group(STREAM, "g")
    with pytest.raises(GroupNotFound):
        bus.reclaim(STREAM, "g", "c", min_idle_ms=0)


def test_blocking_consume_returns_a_message_published_while_waiting(make_bus: MakeBus) -> None:
    bus, producer = make_bus(), make_bus()
    bus.ensure_group(STREAM, "g")
    assert bus.consume(STREAM, "g", "c", block_ms=0) == []
    timer = threading.Timer(0.1, lambda: producer.publish(STREAM, numbered_envelope("late", 0)))
    timer.start()
    try:
        deliveries = bus.consume(STREAM, "g", "c", block_ms=5_000)
    finally:
        timer.join()
    assert [key_of(d.envelope) for d in deliveries] == ["late:0"]


# -- dead letters, bounded length --------------------------------------------------------------------------


def test_a_message_goes_to_the_dead_letter_stream_after_max_deliveries(make_bus: MakeBus) -> None:
    bus = make_bus(max_deliveries=3)
    poison, fine = publish_numbered(bus, 2)
    bus.ensure_group(STREAM, "g")
    bus.consume(STREAM, "g", "c", count=2)
    bus.ack(STREAM, "g", [fine])
    counts = [d.delivery_count for _ in range(2) for d in bus.reclaim(STREAM, "g", "c", min_idle_ms=0)]
    assert counts == [2, 3]
    assert bus.reclaim(STREAM, "g", "c", min_idle_ms=0) == []  # the 4th delivery is a dead letter
    assert bus.reclaim(STREAM, "g", "c", min_idle_ms=0) == []

    dead_stream = Streams.dead_letter(STREAM)
    bus.ensure_group(dead_stream, "inspector")
    (dead,) = bus.consume(dead_stream, "inspector", "human", count=10)
    assert key_of(dead.envelope) == "p:0"
    assert dead.envelope.attributes[DEAD_LETTER_SOURCE_ID] == poison
    assert dead.envelope.attributes[DEAD_LETTER_GROUP] == "g"
    assert dead.envelope.attributes[DEAD_LETTER_DELIVERIES] == "3"
    (stats,) = [s for s in bus.stats() if s.stream == STREAM]
    assert stats.dead_letters == 1
    assert [(g.name, g.pending) for g in stats.groups] == [("g", 0)]

    later = bus.publish(STREAM, numbered_envelope("p", 2))
    assert ids(bus.consume(STREAM, "g", "c")) == [later]


def test_stream_length_is_bounded_and_keeps_the_newest_messages(make_bus: MakeBus) -> None:
    bus = make_bus(maxlen=20)
    published: list[str] = []
    for start in range(0, 400, 10):
        published += bus.publish_many(STREAM, [numbered_envelope("p", n) for n in range(start, start + 10)])
    (stats,) = bus.stats()
    # Redis trims approximately (whole internal nodes of up to 100 entries); embedded trims exactly.
    assert 20 <= stats.length <= 20 + 100
    bus.ensure_group(STREAM, "g")
    kept = drain(bus, "g")
    assert len(kept) == stats.length
    assert kept == [f"p:{n}" for n in range(400 - len(kept), 400)]


# -- payloads ------------------------------------------------------------------------------------------------


def test_payloads_near_the_limit_pass_and_over_the_limit_are_refused(make_bus: MakeBus) -> None:
    limit = 256 * 1024
    bus = make_bus(max_payload_bytes=limit)
    bus.ensure_group(STREAM, "g")
    big = pb.BusEnvelope(message_type=pb.BUS_MESSAGE_TYPE_POLICY_UPDATE, message_id="big")
    big.payload = os.urandom(limit - 64)
    assert len(big.SerializeToString()) <= limit
    bus.publish(STREAM, big)
    too_big = pb.BusEnvelope(message_type=pb.BUS_MESSAGE_TYPE_POLICY_UPDATE, payload=os.urandom(limit + 1))
    with pytest.raises(PayloadTooLarge) as caught:
        bus.publish(STREAM, too_big)
    assert caught.value.limit == limit and caught.value.size > limit
    with pytest.raises(PayloadTooLarge):
        bus.publish_many(STREAM, [numbered_envelope("p", 0), too_big])
    after = bus.publish(STREAM, numbered_envelope("p", 1))
    deliveries = bus.consume(STREAM, "g", "c", count=10)
    assert [d.envelope.message_id for d in deliveries[:1]] == ["big"]
    assert deliveries[0].envelope.payload == big.payload
    assert ids(deliveries[1:]) == [after]


def test_garbage_in_an_envelope_is_a_typed_error_and_the_stream_keeps_working(make_bus: MakeBus) -> None:
    bus = make_bus()
    bus.ensure_group(STREAM, "g")
    garbage = pb.BusEnvelope(
        message_type=pb.BUS_MESSAGE_TYPE_FIELD_REPORT, payload=b"\x0a\xff\xff\xff\xff\x01"
    )
    bus.publish(STREAM, garbage)
    bus.publish(STREAM, envelope_for(pb.EmergencySignal(level=pb.EMERGENCY_LEVEL_HALT, reason="ok")))
    first, second = bus.consume(STREAM, "g", "c", count=10)
    with pytest.raises(MalformedMessage) as caught:
        open_envelope(first.envelope, pb.FieldReport)
    assert caught.value.message_type == "FieldReport"
    with pytest.raises(UnexpectedMessageType):
        open_envelope(second.envelope, pb.FieldReport)
    assert open_envelope(second.envelope, pb.EmergencySignal).reason == "ok"
    assert bus.ack(STREAM, "g", [first.message_id, second.message_id]) == 2
    bus.publish(STREAM, numbered_envelope("p", 9))
    assert [key_of(d.envelope) for d in bus.consume(STREAM, "g", "c")] == ["p:9"]


# -- processes --------------------------------------------------------------------------------


def test_messages_of_a_killed_consumer_are_reclaimed_after_the_idle_timeout(bus_spec: BusSpec) -> None:
    bus = bus_spec.open()
    try:
        published = publish_numbered(bus, 5)
        bus.ensure_group(STREAM, "g")
        out = SPAWN.Queue()
        child = SPAWN.Process(
            target=workers.hold_without_ack,
            args=(bus_spec.esper, bus_spec.oona),
            kwargs={"stream": STREAM, "group": "g", "count": 3, "out": out},
        )
        child.start()
        try:
            held = out.get(timeout=60)
        finally:
            assert child.pid is not None
            os.kill(child.pid, signal.SIGKILL)
            child.join(timeout=30)
        assert child.exitcode == -signal.SIGKILL
        assert held == published[:3]
        assert bus.reclaim(STREAM, "g", "survivor", min_idle_ms=60_000) == []
        time.sleep(0.06)
        reclaimed = bus.reclaim(STREAM, "g", "survivor", min_idle_ms=50, count=10)
        assert ids(reclaimed) == held
        assert all(d.delivery_count == 2 for d in reclaimed)
        assert bus.ack(STREAM, "g", ids(reclaimed)) == 3
        assert ids(bus.consume(STREAM, "g", "survivor", count=10)) == published[3:]
    finally:
        bus.close()


@pytest.mark.slow
def test_concurrent_producers_and_consumers_lose_and_duplicate_nothing(bus_spec: BusSpec) -> None:
    producers, consumers, per_producer = 2, 2, 150
    bus = bus_spec.open()
    try:
        bus.ensure_group(STREAM, "g")
        done = SPAWN.Event()
        out = SPAWN.Queue()
        consumer_procs = [
            SPAWN.Process(
                target=workers.consume_and_ack,
                args=(bus_spec.esper, bus_spec.oona),
                kwargs={
                    "stream": STREAM,
                    "group": "g",
                    "consumer": f"c{i}",
                    "producers_done": done,
                    "out": out,
                },
            )
            for i in range(consumers)
        ]
        producer_procs = [
            SPAWN.Process(
                target=workers.produce, args=(bus_spec.esper, bus_spec.oona, STREAM, f"p{i}", per_producer)
            )
            for i in range(producers)
        ]
        for process in consumer_procs + producer_procs:
            process.start()
        for process in producer_procs:
            process.join(timeout=60)
            assert process.exitcode == 0
        done.set()
        acked = [key for _ in consumer_procs for key in out.get(timeout=60)]
        for process in consumer_procs:
            process.join(timeout=30)
            assert process.exitcode == 0
        expected = {f"p{p}:{n}" for p in range(producers) for n in range(per_producer)}
        assert len(acked) == len(expected)
        assert set(acked) == expected
        (stats,) = bus.stats()
        assert stats.length == producers * per_producer
        assert [(g.name, g.pending) for g in stats.groups] == [("g", 0)]
    finally:
        bus.close()


# -- stats ---------------------------------------------------------------------------------------------------


def test_stats_show_lengths_groups_pending_and_dead_letters(make_bus: MakeBus) -> None:
    bus = make_bus(max_deliveries=1)
    publish_numbered(bus, 3)
    bus.publish(Streams.TELEMETRY, numbered_envelope("t", 0))
    bus.ensure_group(STREAM, "g1")
    bus.ensure_group(STREAM, "g2")
    bus.consume(STREAM, "g1", "c1", count=2)
    bus.consume(STREAM, "g1", "c2", count=1)
    bus.consume(STREAM, "g2", "c1", count=1)
    assert bus.reclaim(STREAM, "g2", "c1", min_idle_ms=0) == []  # max_deliveries=1: dead-lettered
    by_name = {s.stream: s for s in bus.stats()}
    assert sorted(by_name) == [Streams.TELEMETRY, STREAM]
    stream = by_name[STREAM]
    assert stream.length == 3
    assert stream.dead_letters == 1
    assert [(g.name, g.consumers, g.pending) for g in stream.groups] == [("g1", 2, 3), ("g2", 1, 0)]
    assert by_name[Streams.TELEMETRY].groups == ()
    assert by_name[Streams.TELEMETRY].length == 1


# -- property: random operation sequences against a model ----------------------------------------

Operation = tuple[str, int, int]
operations = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.integers(1, 3), st.just(0)),
        st.tuples(st.just("consume"), st.integers(0, 1), st.integers(1, 3)),
        st.tuples(st.just("ack"), st.integers(0, 30), st.just(0)),
        st.tuples(st.just("reclaim"), st.integers(0, 1), st.just(0)),
    ),
    max_size=25,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
def test_random_operation_sequences_match_a_simple_model(make_bus: MakeBus, ops: list[Operation]) -> None:
    bus = make_bus(max_deliveries=1000)
    stream = f"prop.{os.urandom(6).hex()}"
    bus.ensure_group(stream, "g")
    published: list[str] = []
    delivered = 0  # how many of `published` the group has handed out
    pending: dict[str, int] = {}  # message id -> deliveries so far, in id order
    acked: set[str] = set()
    for op, a, b in ops:
        if op == "publish":
            published += bus.publish_many(
                stream, [numbered_envelope("p", len(published) + i) for i in range(a)]
            )
        elif op == "consume":
            got = bus.consume(stream, "g", f"c{a}", count=b)
            expected = published[delivered : delivered + b]
            assert ids(got) == expected
            assert all(d.delivery_count == 1 for d in got)
            delivered += len(got)
            pending.update(dict.fromkeys(expected, 1))
        elif op == "ack":
            seen = published[:delivered]
            if not seen:
                continue
            target = seen[a % len(seen)]
            assert bus.ack(stream, "g", [target]) == (1 if target in pending else 0)
            pending.pop(target, None)
            acked.add(target)
        else:
            got = bus.reclaim(stream, "g", f"c{a}", min_idle_ms=0, count=100)
            assert ids(got) == list(pending)
            for delivery in got:
                pending[delivery.message_id] += 1
                assert delivery.delivery_count == pending[delivery.message_id]
    assert not acked & set(pending)
