"""Emergency signals: one process broadcasts, every process on the bus receives.

Broadcast semantics come from consumer groups: each `EmergencyListener` owns a consumer group of its own
on `Streams.EMERGENCY`, created at the end of the stream, so every listener sees every signal published
after it started, and none sees the signals of earlier runs.

A training loop calls `poll()` between steps (it never blocks by default) and checks `halt_requested`;
a service can `start()` a background thread instead, which calls the callbacks as signals arrive. An
exception from a callback is never swallowed: `poll()` raises `EmergencyHandlerFailed`, and a background
thread stops and re-raises it from `raise_if_failed()` and `stop()`.

Signals are signed (`esper.leyline.signing`, the deployment's secret) and every listener verifies them
(MAC, freshness, its own nonce ledger): a forged, stale or replayed signal is refused, logged as an error
and counted in `rejected_total`; it never sets `halt_requested`. Every accepted signal is logged (a HALT
at CRITICAL), so it is an event in every process that listens.

`open_emergency_listener` is the one way a process (trainer, Tamiyo, Simic) starts listening: it opens
the deployment's bus, builds the verifier from the deployment's settings and starts the thread.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Mapping
from typing import TypeVar

from esper.leyline import (
    SYSTEM_CLOCK,
    Clock,
    ContractViolation,
    EsperSettings,
    MalformedMessage,
    SignatureError,
    SignatureVerifier,
    pb,
    resolve_signing_secret,
    sign,
)
from esper.oona.bus import Bus, BusError, BusUnavailable, GroupNotFound, Streams
from esper.oona.envelopes import UnexpectedMessageType, envelope_for, open_envelope
from esper.oona.factory import open_bus
from esper.oona.settings import OonaSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")

SignalHandler = Callable[[pb.EmergencySignal], None]
TelemetryHandler = Callable[[pb.TelemetryPacket], None]

SIGNAL_VERSION = 1


class EmergencyHandlerFailed(BusError):
    """A listener's callback raised while handling a signal (or an urgent telemetry packet)."""

    def __init__(self, message_id: str, cause: BaseException) -> None:
        self.message_id = message_id
        self.cause = cause
        super().__init__(f"emergency handler failed on {message_id}: {type(cause).__name__}: {cause}")


class EmergencyBroadcaster:
    """Publishes signed `EmergencySignal`s on the emergency stream with CRITICAL priority."""

    def __init__(self, bus: Bus, origin: str, *, secret: bytes, clock: Clock = SYSTEM_CLOCK) -> None:
        if not origin:
            raise ValueError("an emergency broadcaster needs an origin (who raises the signal)")
        self._bus = bus
        self.origin = origin
        self._secret = secret
        self._clock = clock

    def broadcast(
        self,
        level: int,
        reason: str,
        *,
        training_run_id: str = "",
        attributes: Mapping[str, str] | None = None,
    ) -> pb.EmergencySignal:
        """Publish a signal of `level` and return it (with its id and trigger time)."""
        if level == pb.EMERGENCY_LEVEL_UNSPECIFIED:
            raise ValueError("an emergency signal needs a level")
        signal = pb.EmergencySignal(
            version=SIGNAL_VERSION,
            level=level,
            reason=reason,
            origin=self.origin,
            monotonic_time_ms=int(self._clock.monotonic() * 1000),
            training_run_id=training_run_id,
            signal_id=uuid.uuid4().hex,
        )
        signal.triggered_at.FromNanoseconds(self._clock.wall_ns())
        signal.attributes.update(attributes or {})
        sign(signal, self._secret, clock=self._clock)
        envelope = envelope_for(
            signal, pb.MESSAGE_PRIORITY_CRITICAL, trace_id=signal.signal_id, clock=self._clock
        )
        self._bus.publish(Streams.EMERGENCY, envelope)
        logger.warning(
            "oona: emergency %s broadcast by %s: %s", pb.EmergencyLevel.Name(level), self.origin, reason
        )
        return signal

    def halt(self, reason: str, *, training_run_id: str = "") -> pb.EmergencySignal:
        """Broadcast a HALT: every trainer checkpoints and stops."""
        return self.broadcast(pb.EMERGENCY_LEVEL_HALT, reason, training_run_id=training_run_id)


class EmergencyListener:
    """Receives every emergency signal published after it was created, in its own consumer group.

    `verifier` checks each signal's signature, freshness and nonce; give each listener its own (the
    nonce ledger is what makes a replayed signal fail). With `owns_bus`, `close()` also closes `bus`.
    """

    def __init__(
        self,
        bus: Bus,
        settings: OonaSettings,
        *,
        verifier: SignatureVerifier,
        on_signal: SignalHandler | None = None,
        on_telemetry: TelemetryHandler | None = None,
        name: str | None = None,
        batch: int = 64,
        owns_bus: bool = False,
    ) -> None:
        self._bus = bus
        self._settings = settings
        self._verifier = verifier
        self._on_signal = on_signal
        self._on_telemetry = on_telemetry
        self._batch = batch
        self.group = name or f"emergency.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self.halt_requested = threading.Event()
        self.malformed_total = 0
        self.rejected_total = 0
        self.last_rejection: SignatureError | None = None
        self._owns_bus = owns_bus
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        bus.ensure_group(Streams.EMERGENCY, self.group, from_beginning=False)

    def poll(self, block_ms: int = 0) -> list[pb.EmergencySignal]:
        """Signals that arrived since the last poll (callbacks already called); non-blocking by default.

        Malformed envelopes on the emergency stream are acked, logged as errors and counted in
        `malformed_total`; signals that fail verification likewise in `rejected_total` (and
        `last_rejection`). An accepted HALT sets `halt_requested`.
        """
        try:
            deliveries = self._bus.consume(
                Streams.EMERGENCY, self.group, self.group, count=self._batch, block_ms=block_ms
            )
        except GroupNotFound:
            # The backend lost the group (a Redis restarted without persistence): listen again from now;
            # signals sent while the bus was down were lost with it, and the log says so.
            logger.warning(
                "oona: emergency listener %s lost its consumer group; listening again from now", self.group
            )
            self._bus.ensure_group(Streams.EMERGENCY, self.group, from_beginning=False)
            return []
        if not deliveries:
            return []
        # Acked on receipt: the group is this listener's own, so nobody else would ever handle them.
        self._bus.ack(Streams.EMERGENCY, self.group, [d.message_id for d in deliveries])
        signals: list[tuple[str, pb.EmergencySignal]] = []
        urgent: list[tuple[str, pb.TelemetryPacket]] = []
        for delivery in deliveries:
            envelope = delivery.envelope
            try:
                if envelope.message_type == pb.BUS_MESSAGE_TYPE_TELEMETRY:
                    urgent.append((delivery.message_id, open_envelope(envelope, pb.TelemetryPacket)))
                else:
                    signal = open_envelope(envelope, pb.EmergencySignal)
                    self._verifier.verify(signal)
                    signals.append((delivery.message_id, signal))
            except (MalformedMessage, ContractViolation, UnexpectedMessageType) as exc:
                self.malformed_total += 1
                logger.error(
                    "oona: unreadable message %s on the emergency stream: %s", delivery.message_id, exc
                )
            except SignatureError as exc:
                self.rejected_total += 1
                self.last_rejection = exc
                logger.error(
                    "oona: emergency signal %s refused by listener %s: %s",
                    delivery.message_id,
                    self.group,
                    exc,
                )
        for _, signal in signals:
            level = (
                pb.EmergencyLevel.Name(signal.level) if signal.level in pb.EmergencyLevel.values() else "?"
            )
            logger.log(
                logging.CRITICAL if signal.level == pb.EMERGENCY_LEVEL_HALT else logging.WARNING,
                "oona: emergency %s from %s received by %s: %s",
                level,
                signal.origin,
                self.group,
                signal.reason,
            )
            if signal.level == pb.EMERGENCY_LEVEL_HALT:
                self.halt_requested.set()
        self._dispatch(signals, self._on_signal)
        self._dispatch(urgent, self._on_telemetry)
        return [signal for _, signal in signals]

    @staticmethod
    def _dispatch(items: list[tuple[str, T]], handler: Callable[[T], None] | None) -> None:
        if handler is None:
            return
        failure: EmergencyHandlerFailed | None = None
        for message_id, item in items:
            try:
                handler(item)
            except Exception as exc:  # noqa: BLE001 - any callback error; the first one is raised below
                failure = failure or EmergencyHandlerFailed(message_id, exc)
        if failure is not None:
            raise failure

    def start(self) -> None:
        """Poll from a background thread until `stop()`; callbacks run on that thread."""
        if self._thread is not None:
            raise RuntimeError(f"listener {self.group} is already running")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"oona-{self.group}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll(block_ms=self._settings.emergency_poll_ms)
            except BusUnavailable as exc:
                logger.error(
                    "oona: emergency listener %s cannot reach the bus, still trying: %s", self.group, exc
                )
                self._stop.wait(self._settings.emergency_poll_ms / 1000)
            except Exception as exc:  # noqa: BLE001 - kept and re-raised by raise_if_failed() and stop()
                logger.error("oona: emergency listener %s stopped: %s", self.group, exc)
                self._failure = exc
                return

    def raise_if_failed(self) -> None:
        """Re-raise the error that stopped the background thread, if any."""
        if self._failure is not None:
            raise self._failure

    def stop(self) -> None:
        """Stop the background thread (if running) and re-raise its failure, if any."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.raise_if_failed()

    def close(self) -> None:
        """Stop, remove this listener's consumer group, and close the bus if the listener opened it."""
        try:
            self.stop()
        finally:
            try:
                self._bus.delete_group(Streams.EMERGENCY, self.group)
            finally:
                if self._owns_bus:
                    self._bus.close()


def emergency_verifier(esper_settings: EsperSettings, *, clock: Clock = SYSTEM_CLOCK) -> SignatureVerifier:
    """A verifier of emergency signals with the deployment's secret, freshness window and clock skew."""
    return SignatureVerifier(
        resolve_signing_secret(esper_settings),
        freshness_s=esper_settings.command_freshness_s,
        future_skew_s=esper_settings.clock_skew_s,
        clock=clock,
    )


def open_emergency_listener(
    esper_settings: EsperSettings,
    oona_settings: OonaSettings,
    *,
    name: str | None = None,
    on_signal: SignalHandler | None = None,
    on_telemetry: TelemetryHandler | None = None,
    start: bool = True,
) -> EmergencyListener:
    """Listen for emergencies on the deployment's bus: the one call a trainer, Tamiyo or Simic makes.

    Opens its own connection to the bus (closed by `close()`), verifies signals with the deployment's
    secret, and with `start=True` polls from a background thread: check `listener.halt_requested`
    (a `threading.Event`) between steps, or pass `on_signal`. With `start=False`, call `poll()` yourself.
    """
    verifier = emergency_verifier(esper_settings)
    bus = open_bus(esper_settings, oona_settings)
    try:
        listener = EmergencyListener(
            bus,
            oona_settings,
            verifier=verifier,
            on_signal=on_signal,
            on_telemetry=on_telemetry,
            name=name,
            owns_bus=True,
        )
    except BaseException:
        bus.close()
        raise
    if start:
        listener.start()
    return listener
