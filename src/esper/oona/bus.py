"""The bus interface: streams of envelopes, consumer groups, ack, reclaim, dead-letter.

Two backends implement it (embedded SQLite and Redis Streams) and pass one conformance suite. Delivery is
at-least-once: a message stays pending for its group until acked; a consumer that dies leaves it pending,
and another consumer reclaims it after an idle timeout. After `max_deliveries` deliveries a message goes to
the stream's dead-letter stream instead of being delivered again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from esper.leyline import EsperError, pb


class Streams:
    """The streams of an Esper deployment."""

    STATE = "esper.state"
    COMMANDS = "esper.commands"
    FIELD_REPORTS = "esper.field_reports"
    DECISIONS = "esper.decisions"
    TELEMETRY = "esper.telemetry"
    EMERGENCY = "esper.emergency"
    POLICY_UPDATES = "esper.policy_updates"
    CATALOGUE = "esper.catalogue"

    @staticmethod
    def dead_letter(stream: str) -> str:
        """The dead-letter stream of `stream`."""
        return f"{stream}.dead"


class BusError(EsperError):
    """Base of the bus's errors."""


class BusUnavailable(BusError):
    """The backend could not be reached within the retry limit; nothing was published."""


class PayloadTooLarge(BusError):
    """An envelope exceeds the backend's message size limit."""


@dataclass(frozen=True)
class Delivery:
    """One delivery of a message to a consumer of a group."""

    stream: str
    message_id: str
    envelope: pb.BusEnvelope
    delivery_count: int


class Bus(Protocol):
    """What every backend provides."""

    def publish(self, stream: str, envelope: pb.BusEnvelope) -> str:
        """Append `envelope` to `stream` durably; return its message id."""
        ...

    def ensure_group(self, stream: str, group: str) -> None:
        """Create consumer group `group` on `stream` (from the beginning) if it does not exist."""
        ...

    def consume(
        self, stream: str, group: str, consumer: str, *, count: int = 1, block_ms: int = 0
    ) -> list[Delivery]:
        """Deliver up to `count` new messages of `stream` to `consumer` of `group`."""
        ...

    def ack(self, stream: str, group: str, message_ids: list[str]) -> int:
        """Acknowledge messages for `group`; returns how many were pending."""
        ...

    def reclaim(
        self, stream: str, group: str, consumer: str, *, min_idle_ms: int, count: int = 10
    ) -> list[Delivery]:
        """Take over messages pending longer than `min_idle_ms` in `group` and deliver them to `consumer`."""
        ...

    def close(self) -> None:
        """Release the backend's resources."""
        ...
