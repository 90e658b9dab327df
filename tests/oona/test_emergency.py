"""Emergency signals reach every listener, in this process and in others; callback failures surface."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable

import pytest

from esper.leyline import ManualClock, pb
from esper.oona import (
    Bus,
    EmergencyBroadcaster,
    EmergencyHandlerFailed,
    EmergencyListener,
    Streams,
    publish_telemetry,
)
from tests.conftest import BusSpec
from tests.oona import workers

MakeBus = Callable[..., Bus]
SPAWN = multiprocessing.get_context("spawn")


def test_every_listener_receives_every_signal_broadcast_after_it_started(
    make_bus: MakeBus, bus_spec: BusSpec
) -> None:
    broadcaster = EmergencyBroadcaster(make_bus(), origin="tolaria-1", clock=ManualClock())
    broadcaster.broadcast(pb.EMERGENCY_LEVEL_NOTICE, "before anyone listened")
    first = EmergencyListener(make_bus(), bus_spec.oona)
    second = EmergencyListener(make_bus(), bus_spec.oona)
    assert first.poll() == [] and second.poll() == []
    sent = broadcaster.halt("loss exploded", training_run_id="run-7")
    for listener in (first, second):
        (received,) = listener.poll()
        assert received == sent
        assert received.origin == "tolaria-1" and received.level == pb.EMERGENCY_LEVEL_HALT
        assert listener.halt_requested.is_set()
        assert listener.poll() == []


def test_signals_travel_with_critical_priority(make_bus: MakeBus) -> None:
    bus = make_bus()
    bus.ensure_group(Streams.EMERGENCY, "raw")
    EmergencyBroadcaster(bus, origin="o").broadcast(pb.EMERGENCY_LEVEL_ELEVATED, "hot")
    (delivery,) = bus.consume(Streams.EMERGENCY, "raw", "c")
    assert delivery.envelope.priority == pb.MESSAGE_PRIORITY_CRITICAL
    assert delivery.envelope.message_type == pb.BUS_MESSAGE_TYPE_EMERGENCY_SIGNAL


def test_a_failing_callback_surfaces_from_poll(make_bus: MakeBus, bus_spec: BusSpec) -> None:
    seen: list[str] = []

    def handler(signal: pb.EmergencySignal) -> None:
        seen.append(signal.reason)
        if signal.reason == "bad":
            raise RuntimeError("handler broke")

    listener = EmergencyListener(make_bus(), bus_spec.oona, on_signal=handler)
    broadcaster = EmergencyBroadcaster(make_bus(), origin="o")
    broadcaster.broadcast(pb.EMERGENCY_LEVEL_NOTICE, "bad")
    broadcaster.broadcast(pb.EMERGENCY_LEVEL_NOTICE, "good")
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

    listener = EmergencyListener(make_bus(), bus_spec.oona, on_signal=handler)
    listener.start()
    broadcaster = EmergencyBroadcaster(make_bus(), origin="o")
    broadcaster.halt("stop now")
    assert listener.halt_requested.wait(timeout=10)
    broadcaster.broadcast(pb.EMERGENCY_LEVEL_NOTICE, "explode")
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
    listener = EmergencyListener(make_bus(), bus_spec.oona, on_telemetry=urgent.append)
    bus = make_bus()
    publish_telemetry(bus, pb.TelemetryPacket(packet_id="hot", priority=pb.MESSAGE_PRIORITY_HIGH))
    publish_telemetry(bus, pb.TelemetryPacket(packet_id="calm", priority=pb.MESSAGE_PRIORITY_LOW))
    bus.publish(
        Streams.EMERGENCY,
        pb.BusEnvelope(message_type=pb.BUS_MESSAGE_TYPE_EMERGENCY_SIGNAL, payload=b"\x0a\xff\xff\xff"),
    )
    EmergencyBroadcaster(bus, origin="o").halt("after the garbage")
    signals = listener.poll()
    assert [s.reason for s in signals] == ["after the garbage"]
    assert [p.packet_id for p in urgent] == ["hot"]
    assert listener.malformed_total == 1


def test_close_removes_the_listeners_group(make_bus: MakeBus, bus_spec: BusSpec) -> None:
    bus = make_bus()
    listener = EmergencyListener(bus, bus_spec.oona, name="short-lived")
    assert [g.name for s in bus.stats() for g in s.groups] == ["short-lived"]
    listener.close()
    assert [g.name for s in bus.stats() for g in s.groups] == []


def test_two_processes_sharing_the_bus_both_receive_a_halt(bus_spec: BusSpec) -> None:
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
        EmergencyBroadcaster(bus, origin="tolaria-0").halt("divergence")
        results = sorted(out.get(timeout=30) for _ in names)
    finally:
        bus.close()
        for process in processes:
            process.join(timeout=30)
    assert [process.exitcode for process in processes] == [0, 0]
    assert [(name, reason) for name, reason, _ in results] == [(n, "divergence") for n in names]
    # Bounded: the listeners poll every 20 ms; 5 s leaves room for a loaded 2-core machine.
    assert all((arrived - sent_ns) / 1e9 < 5.0 for _, _, arrived in results)
