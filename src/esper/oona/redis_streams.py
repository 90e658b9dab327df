"""The Redis backend: the bus on Redis Streams, for deployments across machines.

Each message is one stream entry with a single field `e` holding the serialised envelope. Commands:
`XADD ... MAXLEN ~ n` (approximate trimming), `XGROUP CREATE ... MKSTREAM`, `XREADGROUP`, `XACK`,
`XAUTOCLAIM` for reclaim, `XPENDING` for delivery counts, and a `MULTI` of `XADD` to the dead-letter
stream plus `XACK` to dead-letter a message.

A call that cannot reach Redis is retried on the `esper.leyline.Backoff` schedule of the settings (each
retry logged as a warning) and then raises `BusUnavailable`. redis-py's own retries are switched off so
that this is the only retry loop. A retried publish whose first attempt reached Redis before the
connection broke may be stored twice: delivery is at-least-once, consumers deduplicate by envelope id.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from esper.leyline import MalformedMessage, pb, serialize
from esper.oona.bus import (
    BusError,
    BusUnavailable,
    Delivery,
    GroupNotFound,
    GroupStats,
    Streams,
    StreamStats,
    dead_letter_envelope,
    decode_envelope,
    encode_envelope,
    summarise_streams,
    undecodable_envelope,
)
from esper.oona.settings import OonaSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")

FIELD = b"e"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisBus:
    """The `Bus` on Redis Streams; thread-safe (redis-py pools its connections)."""

    def __init__(self, url: str, settings: OonaSettings) -> None:
        self.url = url
        self.settings = settings
        self._backoff = settings.backoff()
        self._rng = random.Random()
        try:
            self._client: redis.Redis = redis.Redis.from_url(
                url,
                socket_timeout=settings.socket_timeout_s,
                socket_connect_timeout=settings.socket_timeout_s,
                retry=Retry(NoBackoff(), 0),
                protocol=2,
            )
        except ValueError as exc:
            raise BusError(f"invalid Redis URL {url!r}: {exc}") from exc

    def __repr__(self) -> str:
        return f"RedisBus({self.url!r})"

    # -- plumbing ------------------------------------------------------------------------------------

    def _call(self, operation: str, fn: Callable[[], T], *, group: tuple[str, str] | None = None) -> T:
        attempt = 0
        while True:
            try:
                return fn()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if self._backoff.exhausted(attempt):
                    raise BusUnavailable(operation, self.url, attempt + 1, str(exc)) from exc
                delay_ms = self._backoff.delay_ms(attempt, self._rng)
                logger.warning(
                    "oona: %s on %s failed (%s); retry %d in %.0f ms",
                    operation,
                    self.url,
                    exc,
                    attempt + 1,
                    delay_ms,
                )
                time.sleep(delay_ms / 1000)
                attempt += 1
            except redis.ResponseError as exc:
                if group is not None and str(exc).startswith("NOGROUP"):
                    raise GroupNotFound(*group) from exc
                raise BusError(f"{operation} on {self.url} failed: {exc}") from exc

    def _dead_letter(self, stream: str, group: str, message_id: str, envelope: pb.BusEnvelope) -> None:
        def move() -> None:
            pipe = self._client.pipeline(transaction=True)
            pipe.xadd(
                Streams.dead_letter(stream),
                {FIELD: serialize(envelope)},
                maxlen=self.settings.maxlen,
                approximate=True,
            )
            pipe.xack(stream, group, message_id)
            pipe.execute()

        self._call(f"dead-letter {message_id} of {stream}", move)

    def _decode(self, stream: str, group: str, message_id: str, fields: Any) -> pb.BusEnvelope | None:
        """The entry's envelope, or None after dead-lettering an entry that does not hold one."""
        raw = fields.get(FIELD) if isinstance(fields, dict) else None
        try:
            if raw is None:
                raise MalformedMessage("BusEnvelope", f"stream entry has no {FIELD.decode()!r} field")
            return decode_envelope(raw)
        except MalformedMessage as exc:
            logger.warning(
                "oona: %s message %s is not an envelope, dead-lettered: %s", stream, message_id, exc
            )
            body = raw if isinstance(raw, bytes) else repr(fields).encode()
            self._dead_letter(stream, group, message_id, undecodable_envelope(body, exc))
            return None

    # -- the Bus interface ---------------------------------------------------------------------------

    def publish(self, stream: str, envelope: pb.BusEnvelope) -> str:
        """`XADD stream MAXLEN ~ maxlen * e <envelope>`; returns the entry id."""
        body = encode_envelope(stream, envelope, self.settings.max_payload_bytes)
        result = self._call(
            f"publish to {stream}",
            lambda: self._client.xadd(stream, {FIELD: body}, maxlen=self.settings.maxlen, approximate=True),
        )
        return _text(result)

    def publish_many(self, stream: str, envelopes: list[pb.BusEnvelope]) -> list[str]:
        """Pipelined `XADD`s, one round trip; a retry after a broken connection may duplicate some."""
        bodies = [encode_envelope(stream, e, self.settings.max_payload_bytes) for e in envelopes]

        def send() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for body in bodies:
                pipe.xadd(stream, {FIELD: body}, maxlen=self.settings.maxlen, approximate=True)
            return pipe.execute()

        return [_text(mid) for mid in self._call(f"publish to {stream}", send)] if bodies else []

    def ensure_group(self, stream: str, group: str, *, from_beginning: bool = True) -> None:
        """`XGROUP CREATE stream group 0|$ MKSTREAM`, tolerating an existing group."""

        def create() -> None:
            try:
                self._client.xgroup_create(stream, group, id="0" if from_beginning else "$", mkstream=True)
            except redis.ResponseError as exc:
                if not str(exc).startswith("BUSYGROUP"):
                    raise

        self._call(f"create group {group} on {stream}", create)

    def delete_group(self, stream: str, group: str) -> None:
        """`XGROUP DESTROY`, if the stream exists."""

        def destroy() -> None:
            if self._client.exists(stream):
                self._client.xgroup_destroy(stream, group)

        self._call(f"delete group {group} on {stream}", destroy)

    def consume(
        self, stream: str, group: str, consumer: str, *, count: int = 1, block_ms: int = 0
    ) -> list[Delivery]:
        """`XREADGROUP ... STREAMS stream >`; long blocks are split to stay under the socket timeout."""
        deadline = time.monotonic() + block_ms / 1000
        chunk_ms = max(1, int(self.settings.socket_timeout_s * 500))
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            block = min(remaining_ms, chunk_ms) if remaining_ms > 0 else None
            response: Any = self._call(
                f"consume from {stream}",
                partial(self._client.xreadgroup, group, consumer, {stream: ">"}, count=count, block=block),
                group=(stream, group),
            )
            deliveries = []
            for _, entries in response or []:
                for raw_id, fields in entries:
                    message_id = _text(raw_id)
                    envelope = self._decode(stream, group, message_id, fields)
                    if envelope is not None:
                        deliveries.append(Delivery(stream, message_id, envelope, 1))
            if deliveries or block is None or time.monotonic() >= deadline:
                return deliveries

    def ack(self, stream: str, group: str, message_ids: list[str]) -> int:
        """`XACK`; returns how many were pending."""
        if not message_ids:
            return 0
        return int(self._call(f"ack on {stream}", lambda: self._client.xack(stream, group, *message_ids)))

    def reclaim(
        self, stream: str, group: str, consumer: str, *, min_idle_ms: int, count: int = 10
    ) -> list[Delivery]:
        """`XAUTOCLAIM`, then `XPENDING` for delivery counts; dead-letter past `max_deliveries`."""
        operation = f"reclaim on {stream}"
        response = self._call(
            operation,
            lambda: self._client.xautoclaim(
                stream, group, consumer, min_idle_ms, start_id="0-0", count=count
            ),
            group=(stream, group),
        )
        claimed = [(_text(raw_id), fields) for raw_id, fields in response[1]]
        if not claimed:
            return []

        def pending_counts() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for message_id, _ in claimed:
                pipe.xpending_range(stream, group, min=message_id, max=message_id, count=1)
            return pipe.execute()

        counts = self._call(operation, pending_counts)
        deliveries = []
        for (message_id, fields), entry in zip(claimed, counts, strict=True):
            if not entry:
                continue  # acked by its previous owner between the two calls
            times = int(entry[0]["times_delivered"])
            envelope = self._decode(stream, group, message_id, fields)
            if envelope is None:
                continue
            if times > self.settings.max_deliveries:
                reason = f"not acked after {times - 1} deliveries"
                dead = dead_letter_envelope(
                    envelope, source_id=message_id, group=group, deliveries=times - 1, reason=reason
                )
                self._dead_letter(stream, group, message_id, dead)
                logger.warning(
                    "oona: %s message %s dead-lettered for group %s: %s", stream, message_id, group, reason
                )
                continue
            deliveries.append(Delivery(stream, message_id, envelope, times))
        return deliveries

    def stats(self) -> list[StreamStats]:
        """`SCAN TYPE stream`, then `XLEN` and `XINFO GROUPS` of each."""

        def collect() -> tuple[set[str], dict[str, int], dict[str, list[GroupStats]]]:
            names = {_text(key) for key in self._client.scan_iter(_type="stream")}
            lengths: dict[str, int] = {}
            groups: dict[str, list[GroupStats]] = {}
            for name in sorted(names):
                lengths[name] = int(self._client.xlen(name))
                infos = self._client.xinfo_groups(name)
                groups[name] = sorted(
                    (
                        GroupStats(_text(info["name"]), int(info["consumers"]), int(info["pending"]))
                        for info in infos
                    ),
                    key=lambda g: g.name,
                )
            return names, lengths, groups

        names, lengths, groups = self._call("stats", collect)
        return summarise_streams(names, lengths, groups)

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()
