"""BlueprintMetadataCache: Urza's blueprint descriptors at hand for the graph builder and the risk gates.

- It is a `BlueprintLookup`: `cache(blueprint_id)` returns the descriptor, or None when Tamiyo cannot vouch
  for the blueprint (unknown to the catalogue, or not fetchable in time). None is never a pass: the
  blueprint gate holds a GERMINATE of it and the graph builder marks its features missing.
- Filled from the catalogue (`BlueprintSource`: `BlueprintCatalogue` is one); `warm()` loads a set of ids
  at start. A miss is fetched with the deadline `TAMIYO_METADATA_TIMEOUT_MS`; a failed fetch (timeout,
  corrupt catalogue) is not cached, raises `BlueprintMetadataUnavailable` from `describe()`, and through
  the lookup protocol becomes an event `blueprint_metadata_unavailable` naming the cause.
- Inside a decision the risk gate calls `describe_within(id, remaining_ms)`: an entry is served at once, a
  miss is fetched within what is left of the decision's budget (never past it), and a failure is raised
  to the gate (its own WAIT reason) after the event. A `TamiyoService` routes the events into its
  telemetry (`emit_to`), so a cache built before the service reports through it.
- Invalidated by Urza's `CatalogueChange` notifications, read from a consumer group of its own. A change
  drops the entry and re-reads it from the catalogue (notifications are not signed, so their payload is
  never trusted: the catalogue stays the source of truth). Lookups never touch the bus: the owner calls
  `poll()` between decisions, or `start()`s a thread that polls every `poll_interval_s`.
- When the notifications cannot be read (bus down, group lost, unreadable message) the cache cannot know
  what changed: it drops every entry and reads through to the catalogue until the feed works again.
- Eviction is deterministic: least recently used first at a fixed capacity; entries last used at the same
  tick (a warm-up) leave in blueprint id order.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from esper.leyline import EsperError, pb
from esper.oona import BusError
from esper.tamiyo.settings import TamiyoSettings
from esper.urza import CatalogueChangeFeed, UnknownBlueprint, UrzaError

logger = logging.getLogger(__name__)

UNAVAILABLE_EVENT = "blueprint_metadata_unavailable"


class BlueprintSource(Protocol):
    """Where descriptors come from: Urza's catalogue."""

    def get(self, blueprint_id: str, *, timeout_ms: float | None = None) -> pb.BlueprintDescriptor:
        """The descriptor, `UnknownBlueprint`, or another `UrzaError` (e.g. `CatalogueTimeout`)."""
        ...


class EventSink(Protocol):
    """Receives the cache's events (`TamiyoTelemetry.emit` is one)."""

    def __call__(self, name: str, description: str, /, **attributes: str) -> object:
        """Record event `name`."""
        ...


class BlueprintMetadataUnavailable(EsperError):
    """The descriptor of a blueprint could not be fetched from the catalogue (so it is not vouched for)."""

    def __init__(self, blueprint_id: str, reason: str) -> None:
        self.blueprint_id = blueprint_id
        self.reason = reason
        super().__init__(f"metadata of blueprint {blueprint_id!r} is unavailable: {reason}")


@dataclass
class _Entry:
    descriptor: pb.BlueprintDescriptor | None  # None: the catalogue says it does not exist
    last_used: int


@dataclass
class CacheStats:
    """Counters of one cache (read them for metrics; they only grow)."""

    hits: int = 0
    misses: int = 0
    fetch_failures: int = 0
    invalidations: int = 0
    evictions: int = 0
    resyncs: int = 0
    feed_failures: int = 0


def _log_event(name: str, description: str, /, **attributes: str) -> object:
    logger.warning("%s: %s %s", name, description, attributes or "")
    return None


class BlueprintMetadataCache:
    """A bounded, invalidated, deadline-fetching view of the blueprint catalogue; thread-safe."""

    def __init__(
        self,
        source: BlueprintSource,
        settings: TamiyoSettings,
        *,
        feed_factory: Callable[[], CatalogueChangeFeed] | None = None,
        capacity: int = 128,
        emit: EventSink | None = None,
    ) -> None:
        """`feed_factory` opens this cache's notification feed (None: no bus, always read through)."""
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._source = source
        self.timeout_ms = settings.metadata_timeout_ms
        self.capacity = capacity
        self._emit: EventSink = emit or _log_event
        self._feed_factory = feed_factory
        self._feed: CatalogueChangeFeed | None = None
        self._feed_lost = False  # an event was emitted for the current outage
        self._entries: dict[str, _Entry] = {}
        self._tick = 0
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = CacheStats()
        self.last_failure: EsperError | None = None
        self.last_revision = 0
        # Open the feed before anything is cached, so that no change after a fetch can be missed.
        self._connect_feed()

    # -- the lookup the risk gates and the graph builder call ----------------------------------------

    def __call__(self, blueprint_id: str) -> pb.BlueprintDescriptor | None:
        """The descriptor of `blueprint_id`, or None (unknown, or unavailable: an event says which)."""
        try:
            return self.describe_within(blueprint_id, None)
        except BlueprintMetadataUnavailable:
            return None

    def describe_within(self, blueprint_id: str, timeout_ms: float | None) -> pb.BlueprintDescriptor | None:
        """`describe` within `timeout_ms` (the risk gate's lookup, inside a decision); a failure is a
        `blueprint_metadata_unavailable` event naming its cause, then raised."""
        try:
            return self.describe(blueprint_id, timeout_ms=timeout_ms)
        except BlueprintMetadataUnavailable as exc:
            self._emit(UNAVAILABLE_EVENT, str(exc), blueprint_id=blueprint_id, reason=exc.reason)
            raise

    def describe(
        self, blueprint_id: str, *, timeout_ms: float | None = None
    ) -> pb.BlueprintDescriptor | None:
        """The descriptor (a copy), None when the catalogue has no such blueprint.

        `timeout_ms` bounds the whole lookup for a caller inside a decision (the decision's remaining
        budget): waiting for another lookup's fetch and a fetch of a miss both count against it, and the
        fetch keeps `TAMIYO_METADATA_TIMEOUT_MS` as its ceiling. Raises `BlueprintMetadataUnavailable` when
        the catalogue could not answer in time (or failed), with the reason.
        """
        budget_ms = timeout_ms
        if timeout_ms is None:
            acquired = self._lock.acquire()
        elif self._lock.acquire(blocking=False):
            acquired = True
        else:  # another lookup or a poll is fetching: the wait counts against the budget
            waited_from = time.monotonic()
            acquired = timeout_ms > 0 and self._lock.acquire(timeout=timeout_ms / 1000)
            budget_ms = timeout_ms - (time.monotonic() - waited_from) * 1e3
        if not acquired:
            self.stats.fetch_failures += 1
            raise BlueprintMetadataUnavailable(
                blueprint_id, "another catalogue fetch outlasted the decision's remaining budget"
            )
        try:
            self._tick += 1
            entry = self._entries.get(blueprint_id)
            if entry is not None:
                self.stats.hits += 1
                entry.last_used = self._tick
            else:
                self.stats.misses += 1
                fetch_ms = self.timeout_ms if budget_ms is None else min(self.timeout_ms, budget_ms)
                descriptor = self._fetch(blueprint_id, fetch_ms)
                entry = _Entry(descriptor, self._tick)
                if self._feed is not None:  # without notifications nothing may be kept
                    self._insert(blueprint_id, entry)
            return self._copy(entry.descriptor)
        finally:
            self._lock.release()

    def emit_to(self, emit: EventSink) -> None:
        """Send this cache's events to `emit` from now on (a service's telemetry; thread-safe there)."""
        self._emit = emit

    def warm(self, blueprint_ids: Iterable[str]) -> None:
        """Fetch `blueprint_ids` now (outside any decision); raises `BlueprintMetadataUnavailable`."""
        with self._lock:
            self._tick += 1
            for blueprint_id in blueprint_ids:
                entry = _Entry(self._fetch(blueprint_id, self.timeout_ms), self._tick)
                if self._feed is not None:
                    self._insert(blueprint_id, entry)

    def __contains__(self, blueprint_id: object) -> bool:
        with self._lock:
            return blueprint_id in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    # -- notifications --------------------------------------------------------------------------------

    def poll(self, *, block_ms: int = 0) -> int:
        """Apply the catalogue changes published since the last poll; returns how many were applied.

        Never raises for the bus: when the feed cannot be read the cache drops everything, reads through
        until a later poll reconnects, and emits an event.
        """
        with self._lock:
            feed = self._feed
        if feed is None:
            if not self._connect_feed():
                return 0
            with self._lock:
                feed = self._feed
            if feed is None:
                return 0
        try:
            batch = feed.poll(block_ms=block_ms)
        except BusError as exc:
            self._lose_feed(f"catalogue notifications unreadable: {exc}")
            return 0
        with self._lock:
            if batch.resync:
                self.stats.resyncs += 1
                self._drop_all()
                self._emit(
                    UNAVAILABLE_EVENT,
                    "catalogue notifications may have been missed; every cached descriptor was dropped",
                    reason="resync",
                    malformed=str(batch.malformed),
                )
            refetch = []
            for change in batch.changes:
                self.last_revision = max(self.last_revision, int(change.revision))
                blueprint_id = str(change.blueprint_id)
                if self._entries.pop(blueprint_id, None) is not None:
                    self.stats.invalidations += 1
                    refetch.append(blueprint_id)
        # Read the changed descriptors again now, so the next decision does not pay for the miss. One
        # at a time, so a decision on another thread waits for one fetch at most, not for all of them.
        for blueprint_id in dict.fromkeys(refetch):
            self(blueprint_id)
        return len(batch.changes)

    def start(self, poll_interval_s: float = 0.1) -> None:
        """Poll from a background thread every `poll_interval_s` until `close()`."""
        if poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be > 0, got {poll_interval_s}")
        if self._thread is not None:
            raise RuntimeError("the metadata cache is already polling")
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, args=(poll_interval_s,), name="tamiyo-metadata-cache", daemon=True
        )
        self._thread.start()

    def _run(self, poll_interval_s: float) -> None:
        while not self._stop.wait(poll_interval_s):
            self.poll()

    def close(self) -> None:
        """Stop the thread and remove this cache's consumer group from the bus."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            feed, self._feed = self._feed, None
            self._drop_all()
        if feed is not None:
            feed.close()

    # -- internals -----------------------------------------------------------------------------------

    def _fetch(self, blueprint_id: str, timeout_ms: float) -> pb.BlueprintDescriptor | None:
        if timeout_ms <= 0:
            self.stats.fetch_failures += 1
            failure = BlueprintMetadataUnavailable(blueprint_id, "no time left in the decision's budget")
            self.last_failure = failure
            raise failure
        try:
            return self._source.get(blueprint_id, timeout_ms=timeout_ms)
        except UnknownBlueprint:
            return None
        except UrzaError as exc:
            self.stats.fetch_failures += 1
            failure = BlueprintMetadataUnavailable(blueprint_id, f"{type(exc).__name__}: {exc}")
            self.last_failure = failure
            raise failure from exc

    def _insert(self, blueprint_id: str, entry: _Entry) -> None:
        self._entries[blueprint_id] = entry
        while len(self._entries) > self.capacity:
            victim = min(self._entries.items(), key=lambda item: (item[1].last_used, item[0]))[0]
            del self._entries[victim]
            self.stats.evictions += 1

    def _drop_all(self) -> None:
        self.stats.invalidations += len(self._entries)
        self._entries.clear()

    def _connect_feed(self) -> bool:
        if self._feed_factory is None:
            return False
        try:
            feed = self._feed_factory()
        except BusError as exc:
            self._lose_feed(f"cannot subscribe to catalogue notifications: {exc}")
            return False
        with self._lock:
            self._feed = feed
            if self._feed_lost:
                self._feed_lost = False
                logger.info("tamiyo: catalogue notifications readable again; caching resumes")
        return True

    def _lose_feed(self, reason: str) -> None:
        with self._lock:
            self.stats.feed_failures += 1
            self._feed = None
            self._drop_all()
            first = not self._feed_lost
            self._feed_lost = True
        if first:  # one event per outage; every poll during it retries
            self._emit(
                UNAVAILABLE_EVENT, f"{reason}; reading through to the catalogue", reason="notifications"
            )

    @staticmethod
    def _copy(descriptor: pb.BlueprintDescriptor | None) -> pb.BlueprintDescriptor | None:
        if descriptor is None:
            return None
        copy = pb.BlueprintDescriptor()
        copy.CopyFrom(descriptor)
        return copy
