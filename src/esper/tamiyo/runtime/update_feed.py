"""The policy-update feed: `PolicyUpdate`s read from the bus in a consumer group, acked after they were
offered; a message that cannot be read is a rejection with its reason, never a crash of the reader."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from esper.leyline import (
    MalformedMessage,
    parse,
    pb,
)
from esper.oona import Bus, Delivery, GroupNotFound, Streams
from esper.tamiyo.model.checkpoint import PolicyUpdateRejected

_log = logging.getLogger("esper.tamiyo")


@dataclass(frozen=True)
class FeedItem:
    """One message of the policy-update stream: its bus id, and the update or why it could not be read."""

    message_id: str
    update: pb.PolicyUpdate | PolicyUpdateRejected

    @property
    def order(self) -> int:
        """Sort key: unreadable messages first, then updates newest first."""
        return -1 if isinstance(self.update, PolicyUpdateRejected) else -int(self.update.sequence)


class PolicyUpdateFeed:
    """The policy-update stream as this Tamiyo's consumer group sees it.

    Every Tamiyo has its own group, so every one of them sees every update. A message is acked once it was
    offered (`ack`), whether the update was then accepted or rejected: a refused update is not redelivered.
    Messages left unacked (by a process that died, or an ack that failed) are taken back by the next
    `fetch` of this consumer. A group the bus lost (a Redis restarted without persistence) is made again.
    """

    def __init__(self, bus: Bus, group: str, *, consumer: str = "tamiyo", batch: int = 8) -> None:
        self._bus = bus
        self._group = group
        self._consumer = consumer
        self._batch = batch
        self._reclaim = True  # what a previous life of this consumer left unacked comes first
        self._unsettled: set[str] = set()  # fetched and not acked yet
        bus.ensure_group(Streams.POLICY_UPDATES, group, from_beginning=True)

    def remove_group(self) -> None:
        """Delete this Tamiyo's consumer group: for a run that has ended for good (a group nobody reads
        would otherwise keep receiving every update the deployment publishes)."""
        self._bus.delete_group(Streams.POLICY_UPDATES, self._group)

    def fetch(self) -> list[FeedItem]:
        """Every update waiting now (no blocking), not yet acked; undecodable ones as rejections.

        Raises `BusError` when the bus cannot be reached; nothing is lost then.
        """
        items: list[FeedItem] = []
        if self._reclaim or self._unsettled:
            deliveries = self._in_group(
                lambda: self._bus.reclaim(
                    Streams.POLICY_UPDATES, self._group, self._consumer, min_idle_ms=0, count=self._batch
                )
            )
            items.extend(self._decode(delivery) for delivery in deliveries)
            self._reclaim = len(deliveries) >= self._batch  # more may be pending: take them next time
        while True:
            deliveries = self._in_group(
                lambda: self._bus.consume(
                    Streams.POLICY_UPDATES, self._group, self._consumer, count=self._batch, block_ms=0
                )
            )
            if not deliveries:
                self._unsettled = {item.message_id for item in items}
                return items
            items.extend(self._decode(delivery) for delivery in deliveries)

    def ack(self, message_ids: list[str]) -> None:
        """Acknowledge offered messages; on `BusError` they stay pending and are fetched again."""
        if message_ids:
            self._bus.ack(Streams.POLICY_UPDATES, self._group, message_ids)
            self._unsettled.difference_update(message_ids)

    def _in_group(self, operation: Callable[[], list[Delivery]]) -> list[Delivery]:
        try:
            return operation()
        except GroupNotFound:
            _log.warning("policy-update group %s was lost by the bus; it is made again", self._group)
            self._bus.ensure_group(Streams.POLICY_UPDATES, self._group, from_beginning=True)
            return operation()

    @staticmethod
    def _decode(delivery: Delivery) -> FeedItem:
        envelope = delivery.envelope
        # Contract checks happen in the intake, where their rejection is reported.
        if envelope.message_type != pb.BUS_MESSAGE_TYPE_POLICY_UPDATE:
            kind = (
                pb.BusMessageType.Name(envelope.message_type)
                if envelope.message_type in pb.BusMessageType.values()
                else str(envelope.message_type)
            )
            rejection = PolicyUpdateRejected("malformed", f"bus message {delivery.message_id} holds {kind}")
            return FeedItem(delivery.message_id, rejection)
        try:
            return FeedItem(delivery.message_id, parse(pb.PolicyUpdate, envelope.payload))
        except MalformedMessage as exc:
            rejection = PolicyUpdateRejected("malformed", f"bus message {delivery.message_id}: {exc.reason}")
            return FeedItem(delivery.message_id, rejection)
