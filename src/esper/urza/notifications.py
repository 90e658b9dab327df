"""Catalogue change notifications on the bus: Urza publishes them, caches (Tamiyo's) consume them.

Publishing side: the catalogue writes each change into its outbox in the same transaction as the change
itself, and hands the outbox to a `ChangePublisher` after the commit (`BusChangePublisher` puts the
changes on `Streams.CATALOGUE`). Delivery is at-least-once: a change may be published twice (a crash
between publish and outbox cleanup, two processes flushing at once), never lost.

Consuming side: a `CatalogueChangeFeed` is one consumer group on `Streams.CATALOGUE`, created at the end
of the stream, acked on receipt. A consumer must treat changes as idempotent invalidations ("blueprint X
changed at revision R"), not as data to apply blindly: notifications are not signed, and the catalogue
itself stays the source of truth.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from esper.leyline import ContractViolation, MalformedMessage, pb
from esper.oona import Bus, GroupNotFound, Streams, UnexpectedMessageType, envelope_for, open_envelope

logger = logging.getLogger(__name__)


class ChangePublisher(Protocol):
    """Where the catalogue's committed changes go; raises on failure (the outbox keeps them)."""

    def publish(self, changes: Sequence[pb.CatalogueChange]) -> None:
        """Publish `changes` in order, all or (on an exception) possibly none."""
        ...


class BusChangePublisher:
    """Publishes catalogue changes on `Streams.CATALOGUE` of an Oona bus, in one round trip."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus

    def publish(self, changes: Sequence[pb.CatalogueChange]) -> None:
        """`publish_many` on the catalogue stream; raises the bus's `BusError` when it cannot."""
        if not changes:
            return
        envelopes = [envelope_for(change, trace_id=f"urza.revision.{change.revision}") for change in changes]
        self._bus.publish_many(Streams.CATALOGUE, envelopes)


@dataclass(frozen=True)
class ChangeBatch:
    """What one poll of a feed returned.

    `resync` is True when changes may have been missed (the group was lost, e.g. a Redis restart, or a
    message was unreadable): the consumer must then forget everything it derived from earlier changes.
    """

    changes: tuple[pb.CatalogueChange, ...]
    resync: bool = False
    malformed: int = 0


class CatalogueChangeFeed:
    """Catalogue changes published after this feed was created, for one consumer (its own group)."""

    def __init__(self, bus: Bus, *, group: str | None = None, batch: int = 64) -> None:
        self._bus = bus
        self._batch = batch
        self.group = group or f"catalogue.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        bus.ensure_group(Streams.CATALOGUE, self.group, from_beginning=False)

    def poll(self, *, block_ms: int = 0) -> ChangeBatch:
        """New changes (acked on receipt); non-blocking by default. Raises the bus's `BusError`.

        Messages that are not valid `CatalogueChange`s are acked, logged as errors and counted.
        """
        try:
            deliveries = self._bus.consume(
                Streams.CATALOGUE, self.group, self.group, count=self._batch, block_ms=block_ms
            )
        except GroupNotFound:
            # The backend lost the group (a Redis restart): start again at the end and tell the consumer
            # that whatever was published in between is unknown.
            logger.warning("urza: catalogue feed %s lost its group; resynchronising", self.group)
            self._bus.ensure_group(Streams.CATALOGUE, self.group, from_beginning=False)
            return ChangeBatch((), resync=True)
        if not deliveries:
            return ChangeBatch(())
        self._bus.ack(Streams.CATALOGUE, self.group, [d.message_id for d in deliveries])
        changes: list[pb.CatalogueChange] = []
        malformed = 0
        for delivery in deliveries:
            try:
                changes.append(open_envelope(delivery.envelope, pb.CatalogueChange))
            except (MalformedMessage, ContractViolation, UnexpectedMessageType) as exc:
                malformed += 1
                logger.error(
                    "urza: unreadable message %s on %s: %s", delivery.message_id, Streams.CATALOGUE, exc
                )
        # A change we cannot read names no blueprint: the consumer must assume any of them changed.
        return ChangeBatch(tuple(changes), resync=malformed > 0, malformed=malformed)

    def close(self) -> None:
        """Remove this feed's consumer group from the bus."""
        self._bus.delete_group(Streams.CATALOGUE, self.group)
