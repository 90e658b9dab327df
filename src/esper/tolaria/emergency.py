"""Emergency halt, the trainer's side: listen for HALT signals between steps, and raise one when training
cannot go on.

The trainer talks to an `EmergencyChannel` (a small protocol, so tests can script one); `BusEmergencyChannel`
is the real one, built on Oona's `EmergencyListener` and `EmergencyBroadcaster`. A HALT concerns this run
when it names no run (every trainer on the bus stops) or names this run. Polls are rate-limited by the
monotonic clock so that a fast training step does not pay a bus round-trip every time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from esper.leyline import SYSTEM_CLOCK, Clock, EsperSettings, pb, resolve_signing_secret
from esper.oona import (
    Bus,
    BusUnavailable,
    EmergencyBroadcaster,
    EmergencyListener,
    OonaSettings,
    open_bus,
    open_emergency_listener,
)

logger = logging.getLogger(__name__)

DEFAULT_POLL_INTERVAL_S = 0.05


@dataclass(frozen=True)
class HaltRequest:
    """A HALT this trainer obeys: why, who asked, and the signal's id."""

    reason: str
    origin: str
    signal_id: str
    training_run_id: str = ""


@dataclass(frozen=True)
class ChannelTrouble:
    """The channel could not be read (the bus is down): the trainer logs it as a degraded-operation event."""

    reason: str


class EmergencyChannel(Protocol):
    """What the trainer needs of the emergency stream."""

    def poll_halt(self) -> HaltRequest | ChannelTrouble | None:
        """A HALT for this run received since the last poll, trouble reading the channel, or None."""
        ...

    def broadcast_halt(self, reason: str) -> str:
        """Tell every process on the bus to halt; returns the signal id."""
        ...


class BusEmergencyChannel:
    """The emergency stream of an Oona bus, for one training run: a verifying listener polled on the
    trainer's own thread (no background thread beside torch, DESIGN §10) and a signing broadcaster."""

    def __init__(
        self,
        listener: EmergencyListener,
        broadcaster: EmergencyBroadcaster,
        *,
        training_run_id: str,
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
        clock: Clock = SYSTEM_CLOCK,
        owned_bus: Bus | None = None,
    ) -> None:
        if poll_interval_s < 0:
            raise ValueError(f"poll_interval_s must be >= 0, got {poll_interval_s}")
        self.training_run_id = training_run_id
        self.poll_interval_s = poll_interval_s
        self._clock = clock
        self._listener = listener
        self._broadcaster = broadcaster
        self._owned_bus = owned_bus
        self._next_poll = 0.0

    @classmethod
    def open(
        cls,
        esper_settings: EsperSettings,
        oona_settings: OonaSettings,
        *,
        training_run_id: str,
        origin: str,
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
    ) -> BusEmergencyChannel:
        """Listen and broadcast on the deployment's bus (`ESPER_BUS_URL`, the embedded file by default)."""
        listener = open_emergency_listener(esper_settings, oona_settings, start=False)
        try:
            bus = open_bus(esper_settings, oona_settings)
        except BaseException:
            listener.close()
            raise
        broadcaster = EmergencyBroadcaster(bus, origin, secret=resolve_signing_secret(esper_settings))
        return cls(
            listener,
            broadcaster,
            training_run_id=training_run_id,
            poll_interval_s=poll_interval_s,
            owned_bus=bus,
        )

    def poll_halt(self) -> HaltRequest | ChannelTrouble | None:
        """Read the stream (at most once per `poll_interval_s`) and return the first HALT for this run."""
        now = self._clock.monotonic()
        if now < self._next_poll:
            return None
        self._next_poll = now + self.poll_interval_s
        try:
            signals = self._listener.poll()
        except BusUnavailable as exc:
            return ChannelTrouble(reason=f"emergency stream unreadable: {exc}")
        for signal in signals:
            if signal.level != pb.EMERGENCY_LEVEL_HALT:
                logger.warning(
                    "tolaria: emergency %s from %s: %s",
                    pb.EmergencyLevel.Name(signal.level),
                    signal.origin,
                    signal.reason,
                )
                continue
            if signal.training_run_id in ("", self.training_run_id):
                return HaltRequest(
                    reason=signal.reason,
                    origin=signal.origin,
                    signal_id=signal.signal_id,
                    training_run_id=signal.training_run_id,
                )
        return None

    def broadcast_halt(self, reason: str) -> str:
        """Broadcast a HALT to every process on the bus (no run named: it concerns all of them)."""
        signal = self._broadcaster.broadcast(
            pb.EMERGENCY_LEVEL_HALT, reason, attributes={"source_run": self.training_run_id}
        )
        return str(signal.signal_id)

    def close(self) -> None:
        """Remove this channel's consumer group and close the connections it opened."""
        try:
            self._listener.close()
        finally:
            if self._owned_bus is not None:
                self._owned_bus.close()
