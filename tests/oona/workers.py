"""Functions that run in spawned processes of the Oona tests (importable, so `spawn` can find them)."""

from __future__ import annotations

import time
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event

from esper.leyline import EsperSettings, pb
from esper.oona import OonaSettings, envelope_for, open_bus, open_emergency_listener


def numbered_envelope(producer: str, number: int) -> pb.BusEnvelope:
    """An envelope that says who produced it and its number in that producer's sequence."""
    signal = pb.EmergencySignal(level=pb.EMERGENCY_LEVEL_NOTICE, reason=f"{producer}:{number}")
    return envelope_for(signal, attributes={"producer": producer, "number": str(number)})


def key_of(envelope: pb.BusEnvelope) -> str:
    """The `producer:number` key of a numbered envelope."""
    return f"{envelope.attributes['producer']}:{envelope.attributes['number']}"


def hold_without_ack(
    esper: EsperSettings, oona: OonaSettings, *, stream: str, group: str, count: int, out: Queue[list[str]]
) -> None:
    """Consume `count` messages, report their ids, never ack them, and wait to be killed."""
    bus = open_bus(esper, oona)
    held: list[str] = []
    while len(held) < count:
        held += [
            d.message_id for d in bus.consume(stream, group, "doomed", count=count - len(held), block_ms=100)
        ]
    out.put(held)
    time.sleep(120)


def produce(esper: EsperSettings, oona: OonaSettings, stream: str, producer: str, total: int) -> None:
    """Publish `total` numbered envelopes, alternating single and batched publishes."""
    bus = open_bus(esper, oona)
    number = 0
    while number < total:
        if number % 2:
            bus.publish(stream, numbered_envelope(producer, number))
            number += 1
        else:
            batch = [numbered_envelope(producer, n) for n in range(number, min(number + 5, total))]
            bus.publish_many(stream, batch)
            number += len(batch)
    bus.close()


def consume_and_ack(
    esper: EsperSettings,
    oona: OonaSettings,
    *,
    stream: str,
    group: str,
    consumer: str,
    producers_done: Event,
    out: Queue[list[str]],
) -> None:
    """Consume and ack until the producers are done and the stream is drained; report the keys acked."""
    bus = open_bus(esper, oona)
    acked: list[str] = []
    while True:
        deliveries = bus.consume(stream, group, consumer, count=7, block_ms=50)
        if not deliveries:
            if producers_done.is_set():
                break
            continue
        bus.ack(stream, group, [d.message_id for d in deliveries])
        acked += [key_of(d.envelope) for d in deliveries]
    bus.close()
    out.put(acked)


def wait_for_halt(
    esper: EsperSettings, oona: OonaSettings, name: str, ready: Queue[str], out: Queue[tuple[str, str, int]]
) -> None:
    """Listen for emergencies from a background thread; report the first HALT and when it arrived."""
    received: list[pb.EmergencySignal] = []
    listener = open_emergency_listener(esper, oona, name=name, on_signal=received.append)
    ready.put(name)
    if not listener.halt_requested.wait(timeout=30):
        listener.stop()
        raise TimeoutError(f"{name} saw no halt within 30 s")
    arrived_ns = time.time_ns()
    listener.close()
    out.put((name, received[0].reason, arrived_ns))
