"""Emergency signals reach every listener, in this process and in others; forged signals are refused;
callback failures surface."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable

import pytest

from esper.leyline import (
    ManualClock,
    ReplayDetected,
    SignatureInvalid,
    SignatureVerifier,
    StaleMessage,
    pb,
    resolve_signing_secret,
    sign,
)
from esper.oona import (
    Bus,
    EmergencyBroadcaster,
    EmergencyHandlerFailed,
    EmergencyListener,
    OonaSettings,
    Streams,
    envelope_for,
    open_emergency_listener,
    publish_telemetry,
)
from tests.conftest import BusSpec
from tests.oona import workers

MakeBus = Callable[..., Bus]
SPAWN = multiprocessing.get_context("spawn")
SECRET = b"emergency-test-secret-0123456789"


def broadcaster(bus: Bus, origin: str = "o", clock: ManualClock | None = None) -> EmergencyBroadcaster:
    if clock is None:
        return EmergencyBroadcaster(bus, origin=origin, secret=SECRET)
    return EmergencyBroadcaster(bus, origin=origin, secret=SECRET, clock=clock)


def listener_on(
    bus: Bus,
    oona: OonaSettings,
    *,
    clock: ManualClock | None = None,
    name: str | None = None,
    on_signal: Callable[[pb.EmergencySignal], None] | None = None,
    on_telemetry: Callable[[pb.TelemetryPacket], None] | None = None,
) -> EmergencyListener:
    verifier = SignatureVerifier(SECRET) if clock is None else SignatureVerifier(SECRET, clock=clock)
    return EmergencyListener(
        bus, oona, verifier=verifier, name=name, on_signal=on_signal, on_telemetry=on_telemetry
    )


def test_every_listener_receives_every_signal_broadcast_after_it_started(
    make_bus: MakeBus, bus_spec: BusSpec
) -> None:
    clock = ManualClock()
    sender = broadcaster(make_bus(), "tolaria-1", clock)
    sender.broadcast(pb.EMERGENCY_LEVEL_NOTICE, "before anyone listened")
    first = listener_on(make_bus(), bus_spec.oona, clock=clock)
    second = listener_on(make_bus(), bus_spec.oona, clock=clock)
    assert first.poll() == [] and second.poll() == []
    sent = sender.halt("loss exploded", training_run_id="run-7")
    assert sent.signature and sent.nonce and sent.HasField("issued_at")
    for listener in (first, second):
        (received,) = listener.poll()
        assert received == sent
        assert received.origin == "tolaria-1" and received.level == pb.EMERGENCY_LEVEL_HALT
        assert listener.halt_requested.is_set()
        assert listener.poll() == []


def test_signals_travel_with_critical_priority(make_bus: MakeBus) -> None:
    bus = make_bus()
    bus.ensure_group(Streams.EMERGENCY, "raw")
    broadcaster(bus).broadcast(pb.EMERGENCY_LEVEL_ELEVATED, "hot")
    (delivery,) = bus.consume(Streams.EMERGENCY, "raw", "c")
    assert delivery.envelope.priority == pb.MESSAGE_PRIORITY_CRITICAL
    assert delivery.envelope.message_type == pb.BUS_MESSAGE_TYPE_EMERGENCY_SIGNAL


def test_a_failing_callback_surfaces_from_poll(make_bus: MakeBus, bus_spec: BusSpec) -> None:
    seen: list[str] = []

    def handler(signal: pb.EmergencySignal) -> None:
        seen.append(signal.reason)
        if signal.reason == "bad":
            raise RuntimeError("handler broke")

    listener = listener_on(make_bus(), bus_spec.oona, on_signal=handler)
    sender = broadcaster(make_bus())
    sender.broadcast(pb.EMERGENCY_LEVEL_NOTICE, "bad")
    sender.broadcast(pb.EMERGENCY_LEVEL_NOTICE, "good")
    with pytest.raises(EmergencyHandlerFailed) as caught:
        listener.poll()
    assert isinstance(caught.value.cause, RuntimeError)
    assert seen == ["bad", "good"]
    assert listener.poll() == []


def test_a_background_listener_calls_back_and_reraises_a_callback_failure(
    make_bus: MakeBus, bus_spec: BusSpec
) -> None:
    received: list[pb.EmergencySignal] = []

    def handler(signal: pb.EmergencySignal) -> None:
        received.append(signal)
        if signal.reason == "explode":
            raise ValueError("cannot checkpoint")

    listener = listener_on(make_bus(), bus_spec.oona, on_signal=handler)
    listener.start()
    sender = broadcaster(make_bus())
    sender.halt("stop now")
    assert listener.halt_requested.wait(timeout=10)
    sender.broadcast(pb.EMERGENCY_LEVEL_NOTICE, "explode")
    deadline = time.monotonic() + 10
    while len(received) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(EmergencyHandlerFailed, match="cannot checkpoint"):
        listener.stop()
    assert [s.reason for s in received] == ["stop now", "explode"]


def test_urgent_telemetry_and_malformed_messages_on_the_emergency_stream(
    make_bus: MakeBus, bus_spec: BusSpec
) -> None:
    urgent: list[pb.TelemetryPacket] = []
    listener = listener_on(make_bus(), bus_spec.oona, on_telemetry=urgent.append)
    bus = make_bus()
    publish_telemetry(bus, pb.TelemetryPacket(packet_id="hot", priority=pb.MESSAGE_PRIORITY_HIGH))
    publish_telemetry(bus, pb.TelemetryPacket(packet_id="calm", priority=pb.MESSAGE_PRIORITY_LOW))
    bus.publish(
        Streams.EMERGENCY,
        pb.BusEnvelope(message_type=pb.BUS_MESSAGE_TYPE_EMERGENCY_SIGNAL, payload=b"\x0a\xff\xff\xff"),
    )
    broadcaster(bus).halt("after the garbage")
    signals = listener.poll()
    assert [s.reason for s in signals] == ["after the garbage"]
    assert [p.packet_id for p in urgent] == ["hot"]
    assert listener.malformed_total == 1


def test_close_removes_the_listeners_group(make_bus: MakeBus, bus_spec: BusSpec) -> None:
    bus = make_bus()
    listener = listener_on(bus, bus_spec.oona, name="short-lived")
    assert [g.name for s in bus.stats() for g in s.groups] == ["short-lived"]
    listener.close()
    assert [g.name for s in bus.stats() for g in s.groups] == []


def test_two_processes_sharing_the_bus_both_receive_a_halt(bus_spec: BusSpec) -> None:
    # Resolved (and the key file created) here, before the workers read it.
    secret = resolve_signing_secret(bus_spec.esper)
    ready, out = SPAWN.Queue(), SPAWN.Queue()
    names = ["trainer-a", "trainer-b"]
    processes = [
        SPAWN.Process(target=workers.wait_for_halt, args=(bus_spec.esper, bus_spec.oona, name, ready, out))
        for name in names
    ]
    for process in processes:
        process.start()
    bus = bus_spec.open()
    try:
        assert sorted(ready.get(timeout=60) for _ in names) == names
        sent_ns = time.time_ns()
        EmergencyBroadcaster(bus, origin="tolaria-0", secret=secret).halt("divergence")
        results = sorted(out.get(timeout=30) for _ in names)
    finally:
        bus.close()
        for process in processes:
            process.join(timeout=30)
    assert [process.exitcode for process in processes] == [0, 0]
    assert [(name, reason) for name, reason, _ in results] == [(n, "divergence") for n in names]
    # Bounded: the listeners poll every 20 ms; 5 s leaves room for a loaded 2-core machine.
    assert all((arrived - sent_ns) / 1e9 < 5.0 for _, _, arrived in results)


def _forged_envelope(signal: pb.EmergencySignal) -> pb.BusEnvelope:
    return envelope_for(signal, pb.MESSAGE_PRIORITY_CRITICAL)


def test_forged_tampered_replayed_and_stale_signals_are_refused(make_bus: MakeBus, bus_spec: BusSpec) -> None:
    clock = ManualClock(wall_ns=1_700_000_000 * 10**9)
    bus = make_bus()
    listener = listener_on(make_bus(), bus_spec.oona, clock=clock)
    halt = pb.EmergencySignal(version=1, level=pb.EMERGENCY_LEVEL_HALT, reason="forged", origin="intruder")

    unsigned = pb.EmergencySignal()
    unsigned.CopyFrom(halt)
    bus.publish(Streams.EMERGENCY, _forged_envelope(unsigned))
    other_key = pb.EmergencySignal()
    other_key.CopyFrom(halt)
    bus.publish(
        Streams.EMERGENCY, _forged_envelope(sign(other_key, b"not-the-deployment-key!!", clock=clock))
    )
    assert listener.poll() == []
    assert listener.rejected_total == 2 and isinstance(listener.last_rejection, SignatureInvalid)
    assert not listener.halt_requested.is_set()

    genuine = broadcaster(bus, "tolaria-1", clock).broadcast(pb.EMERGENCY_LEVEL_NOTICE, "real")
    tampered = pb.EmergencySignal()
    tampered.CopyFrom(genuine)
    tampered.level = pb.EMERGENCY_LEVEL_HALT
    bus.publish(Streams.EMERGENCY, _forged_envelope(tampered))
    bus.publish(Streams.EMERGENCY, _forged_envelope(genuine))  # replayed as is
    assert [s.reason for s in listener.poll()] == ["real"]
    assert listener.rejected_total == 4 and isinstance(listener.last_rejection, ReplayDetected)
    assert not listener.halt_requested.is_set()

    an_hour_ago = ManualClock(wall_ns=clock.wall_ns() - 3600 * 10**9)
    broadcaster(bus, "tolaria-1", an_hour_ago).halt("long ago")  # authentic but stale
    assert listener.poll() == []
    assert listener.rejected_total == 5 and isinstance(listener.last_rejection, StaleMessage)
    assert not listener.halt_requested.is_set()
    broadcaster(bus, "tolaria-1", clock).halt("now")
    assert [s.reason for s in listener.poll()] == ["now"]
    assert listener.halt_requested.is_set()


def test_open_emergency_listener_verifies_with_the_deployment_key(bus_spec: BusSpec) -> None:
    received: list[pb.EmergencySignal] = []
    listener = open_emergency_listener(
        bus_spec.esper, bus_spec.oona, name="tamiyo-test", on_signal=received.append, start=False
    )
    bus = bus_spec.open()
    try:
        secret = resolve_signing_secret(bus_spec.esper)
        EmergencyBroadcaster(bus, origin="tolaria", secret=secret).halt("divergence")
        EmergencyBroadcaster(bus, origin="intruder", secret=b"z" * 32).halt("forged")
        assert [s.reason for s in listener.poll()] == ["divergence"]
        assert listener.rejected_total == 1 and listener.halt_requested.is_set()
        assert [s.origin for s in received] == ["tolaria"]
    finally:
        listener.close()
        assert [g.name for s in bus.stats() for g in s.groups] == []
        bus.close()
