"""The bus interface: streams of envelopes, consumer groups, ack, reclaim, dead-letter.

Two backends implement it (embedded SQLite and Redis Streams) and pass one conformance suite. Delivery is
at-least-once: a message stays pending for its group until acked; a consumer that dies leaves it pending,
and another consumer reclaims it after an idle timeout. After `max_deliveries` deliveries a message goes to
the stream's dead-letter stream instead of being delivered again. Streams are trimmed to a maximum length
(oldest first); a message trimmed away before it was consumed is gone, so `maxlen` must cover the largest
backlog a consumer may fall behind by.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from esper.leyline import EsperError, MalformedMessage, parse, pb, serialize

# Attributes added to an envelope when it is moved to a dead-letter stream.
DEAD_LETTER_SOURCE_ID = "oona.dead_letter.source_id"
DEAD_LETTER_GROUP = "oona.dead_letter.group"
DEAD_LETTER_DELIVERIES = "oona.dead_letter.deliveries"
DEAD_LETTER_REASON = "oona.dead_letter.reason"


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

    DEAD_LETTER_SUFFIX = ".dead"

    @staticmethod
    def dead_letter(stream: str) -> str:
        """The dead-letter stream of `stream`."""
        return f"{stream}{Streams.DEAD_LETTER_SUFFIX}"

    @staticmethod
    def is_dead_letter(stream: str) -> bool:
        """True if `stream` is some stream's dead-letter stream."""
        return stream.endswith(Streams.DEAD_LETTER_SUFFIX)


class BusError(EsperError):
    """Base of the bus's errors."""


class BusUnavailable(BusError):
    """The backend could not be reached within the retry limit; the operation did not happen."""

    def __init__(self, operation: str, backend: str, attempts: int, cause: str) -> None:
        self.operation = operation
        self.backend = backend
        self.attempts = attempts
        self.cause = cause
        super().__init__(f"{operation} on {backend} failed after {attempts} attempt(s): {cause}")


class PayloadTooLarge(BusError):
    """An envelope exceeds the backend's message size limit."""

    def __init__(self, stream: str, size: int, limit: int) -> None:
        self.stream = stream
        self.size = size
        self.limit = limit
        super().__init__(f"envelope of {size} bytes for {stream!r} exceeds the limit of {limit} bytes")


class GroupNotFound(BusError):
    """A consumer group was used before `ensure_group` created it (or the backend lost it)."""

    def __init__(self, stream: str, group: str) -> None:
        self.stream = stream
        self.group = group
        super().__init__(f"consumer group {group!r} does not exist on stream {stream!r}")


class InvalidMessageId(BusError):
    """A message id that this backend never hands out."""

    def __init__(self, stream: str, message_id: str) -> None:
        self.stream = stream
        self.message_id = message_id
        super().__init__(f"{message_id!r} is not a message id of stream {stream!r}")


@dataclass(frozen=True)
class Delivery:
    """One delivery of a message to a consumer of a group."""

    stream: str
    message_id: str
    envelope: pb.BusEnvelope
    delivery_count: int


@dataclass(frozen=True)
class GroupStats:
    """A consumer group as `stats` sees it."""

    name: str
    consumers: int
    pending: int


@dataclass(frozen=True)
class StreamStats:
    """A stream, its groups and its dead-letter count."""

    stream: str
    length: int
    groups: tuple[GroupStats, ...]
    dead_letters: int


class Bus(Protocol):
    """What every backend provides."""

    def publish(self, stream: str, envelope: pb.BusEnvelope) -> str:
        """Append `envelope` to `stream` durably; return its message id (increasing within a stream)."""
        ...

    def publish_many(self, stream: str, envelopes: list[pb.BusEnvelope]) -> list[str]:
        """Append several envelopes in order, in one round trip; return their message ids."""
        ...

    def ensure_group(self, stream: str, group: str, *, from_beginning: bool = True) -> None:
        """Create consumer group `group` on `stream` if it does not exist.

        The group starts at the first message of the stream, or with `from_beginning=False` after the
        last message published so far (for listeners that only care about what happens from now on).
        """
        ...

    def delete_group(self, stream: str, group: str) -> None:
        """Remove a consumer group and its pending entries (no error if it does not exist)."""
        ...

    def consume(
        self, stream: str, group: str, consumer: str, *, count: int = 1, block_ms: int = 0
    ) -> list[Delivery]:
        """Deliver up to `count` new messages of `stream` to `consumer` of `group`.

        With `block_ms > 0`, wait up to that long for a first message; with 0, return at once.
        Raises `GroupNotFound` if the group does not exist.
        """
        ...

    def ack(self, stream: str, group: str, message_ids: list[str]) -> int:
        """Acknowledge messages for `group`; returns how many were pending."""
        ...

    def reclaim(
        self, stream: str, group: str, consumer: str, *, min_idle_ms: int, count: int = 10
    ) -> list[Delivery]:
        """Take over messages pending longer than `min_idle_ms` in `group` and deliver them to `consumer`.

        A message that would exceed `max_deliveries` is moved to the dead-letter stream and acked instead.
        """
        ...

    def stats(self) -> list[StreamStats]:
        """Every stream of the bus (dead-letter streams counted under their stream), sorted by name."""
        ...

    def close(self) -> None:
        """Release the backend's resources."""
        ...


def encode_envelope(stream: str, envelope: pb.BusEnvelope, limit: int) -> bytes:
    """Wire form of `envelope`; `PayloadTooLarge` above `limit` bytes."""
    data = serialize(envelope)
    if len(data) > limit:
        raise PayloadTooLarge(stream, len(data), limit)
    return data


def decode_envelope(data: bytes) -> pb.BusEnvelope:
    """Parse stored bytes as an envelope; `MalformedMessage` if they are not one."""
    return parse(pb.BusEnvelope, data)


def dead_letter_envelope(
    envelope: pb.BusEnvelope, *, source_id: str, group: str, deliveries: int, reason: str
) -> pb.BusEnvelope:
    """A copy of `envelope` that records why and from where it was dead-lettered."""
    dead = pb.BusEnvelope()
    dead.CopyFrom(envelope)
    dead.attributes[DEAD_LETTER_SOURCE_ID] = source_id
    dead.attributes[DEAD_LETTER_GROUP] = group
    dead.attributes[DEAD_LETTER_DELIVERIES] = str(deliveries)
    dead.attributes[DEAD_LETTER_REASON] = reason
    return dead


def undecodable_envelope(raw: bytes, error: MalformedMessage) -> pb.BusEnvelope:
    """An envelope that carries stored bytes which did not parse, for the dead-letter stream."""
    envelope = pb.BusEnvelope()
    envelope.payload = raw
    envelope.attributes[DEAD_LETTER_REASON] = f"undecodable envelope: {error.reason}"
    return envelope


def summarise_streams(
    names: set[str], lengths: dict[str, int], groups: dict[str, list[GroupStats]]
) -> list[StreamStats]:
    """One `StreamStats` per stream, each dead-letter stream counted under the stream it belongs to."""
    suffix = len(Streams.DEAD_LETTER_SUFFIX)
    primaries = {name[:-suffix] if Streams.is_dead_letter(name) else name for name in names}
    return [
        StreamStats(
            stream=name,
            length=lengths.get(name, 0),
            groups=tuple(groups.get(name, [])),
            dead_letters=lengths.get(Streams.dead_letter(name), 0),
        )
        for name in sorted(primaries)
    ]
