"""The outbox: field reports and decision records from the store to the bus, with retries (P9).

`FieldReportOutbox.pump()` publishes every due entry once (field reports on `Streams.FIELD_REPORTS`,
decision records on `Streams.DECISIONS`; Simic joins them by `command_id`). A failed publish is retried
with the one `Backoff` of Esper (base, multiplier, jitter from settings) on the injected clock; past the
retry limit, or for an error no retry can fix, the entry is marked dropped: it stays in the store,
queryable, with the last error, and is never retried. Delivery is at least once: a crash between a
publish and its mark publishes the entry again, and consumers deduplicate by report or decision id.

An outbox that `hold`s publishes a run's entries only once a durable checkpoint covers them (the run's
release horizon, `TamiyoStore.release_through`): what was decided after the last checkpoint of a run that
dies never leaves, so nobody learns from steps its resume decides again. Without `hold`, a run that never
set a horizon (a service without a trainer) has its entries published at once.

`OutboxPublisher` runs `pump()` on a background thread so that a slow or unreachable bus never delays a
decision; tests drive `pump()` directly with a `ManualClock`.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

from esper.leyline import Backoff, Clock, EsperError, EventSink, pb
from esper.oona import Bus, BusError, PayloadTooLarge, envelope_for
from esper.tamiyo.records.errors import StoreCorrupted
from esper.tamiyo.records.schema import OutboxEntry
from esper.tamiyo.records.store import TamiyoStore
from esper.tamiyo.settings import TamiyoSettings

# name, description, attributes: the outbox reports through this, whichever thread it runs on.

_MESSAGE_TYPES: dict[str, type[pb.FieldReport] | type[pb.DecisionRecord]] = {
    "field_report": pb.FieldReport,
    "decision": pb.DecisionRecord,
}


class OutboxMetrics:
    """`tamiyo.field_reports.{pending,published,retries,dropped}_total`, and the same for decision records."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self.pending = Gauge(
            "tamiyo_field_reports_pending_total", "Field reports waiting for publication", registry=registry
        )
        self.published = Counter(
            "tamiyo_field_reports_published_total", "Field reports published on the bus", registry=registry
        )
        self.retries = Counter(
            "tamiyo_field_reports_retries_total", "Publication retries of field reports", registry=registry
        )
        self.dropped = Counter(
            "tamiyo_field_reports_dropped_total",
            "Field reports dropped past the retry limit",
            registry=registry,
        )
        self.decisions_published = Counter(
            "tamiyo_decision_records_published_total", "Decision records published", registry=registry
        )
        self.decisions_dropped = Counter(
            "tamiyo_decision_records_dropped_total", "Decision records dropped", registry=registry
        )
        self.pass_failures = Counter(
            "tamiyo_field_reports_outbox_failures_total",
            "Outbox passes that failed (the publisher thread reported the error and carried on)",
            registry=registry,
        )

    def values(self) -> dict[str, float]:
        """The four field-report figures under their dotted names (for telemetry packets)."""
        figures = {}
        for name in ("pending", "published", "retries", "dropped"):
            value = self._registry.get_sample_value(f"tamiyo_field_reports_{name}_total")
            figures[f"tamiyo.field_reports.{name}_total"] = float("nan") if value is None else value
        return figures


@dataclass(frozen=True)
class PumpResult:
    """What one `pump()` did."""

    published: int = 0
    retried: int = 0
    dropped: int = 0

    @property
    def attempted(self) -> int:
        """Entries tried in this pump."""
        return self.published + self.retried + self.dropped


class FieldReportOutbox:
    """Publishes due outbox entries; failures are retried with backoff, then dropped with an event."""

    def __init__(
        self,
        store: TamiyoStore,
        bus: Bus,
        settings: TamiyoSettings,
        clock: Clock,
        *,
        metrics: OutboxMetrics,
        events: EventSink,
        rng: random.Random | None = None,
        hold: bool = False,
    ) -> None:
        self._store = store
        self.hold = hold
        self._bus = bus
        self._clock = clock
        self.metrics = metrics
        self._events = events
        self.batch = settings.fr_outbox_batch
        self._rng = rng or random.Random()
        self.backoff = Backoff(
            base_ms=settings.fr_retry_backoff_ms,
            multiplier=settings.fr_retry_backoff_mult,
            jitter=settings.fr_retry_jitter,
            max_retries=settings.fr_retry_limit,
        )
        self._pump_lock = threading.Lock()
        self.refresh_pending()

    def refresh_pending(self) -> int:
        """Set the pending gauge from the store; returns the count."""
        pending = self._store.pending_count("field_report")
        self.metrics.pending.set(pending)
        return pending

    def seconds_until_due(self) -> float | None:
        """Seconds until the next pending entry is due (0 if one is due now), None if none is pending."""
        due = self._store.next_outbox_due_ns(hold=self.hold)
        if due is None:
            return None
        return max(0.0, (due - self._clock.wall_ns()) / 1e9)

    def pump(self) -> PumpResult:  # noqa: C901, PLR0912 (one batch's publish, acknowledge, retry and drop outcomes under one lock)
        """Publish one batch of due entries (one bus call per stream); returns what happened."""
        with self._pump_lock:
            entries = self._store.due_outbox(self._clock.wall_ns(), self.batch, hold=self.hold)
            published = retried = dropped = 0
            by_stream: dict[str, list[OutboxEntry]] = {}
            for entry in entries:
                by_stream.setdefault(entry.stream, []).append(entry)
            for stream, group in by_stream.items():
                sendable: list[OutboxEntry] = []
                envelopes: list[pb.BusEnvelope] = []
                for entry in group:
                    try:
                        envelopes.append(self._envelope(entry))
                        sendable.append(entry)
                    except StoreCorrupted as exc:
                        self._drop(entry, f"stored payload is unreadable: {exc.detail}")
                        dropped += 1
                for entry in sendable:
                    if entry.attempts > 0 and entry.kind == "field_report":
                        self.metrics.retries.inc()
                if not envelopes:
                    continue
                try:
                    self._bus.publish_many(stream, envelopes)
                except PayloadTooLarge as exc:
                    for entry in sendable:  # no retry can shrink a message: drop it now, with the reason
                        self._drop(entry, str(exc))
                    dropped += len(sendable)
                except BusError as exc:
                    for entry in sendable:
                        if self._failed(entry, f"{type(exc).__name__}: {exc}"):
                            retried += 1
                        else:
                            dropped += 1
                else:
                    self._store.mark_published(sendable)
                    reports = sum(1 for entry in sendable if entry.kind == "field_report")
                    self.metrics.published.inc(reports)
                    self.metrics.decisions_published.inc(len(sendable) - reports)
                    published += len(sendable)
            if entries:
                self.refresh_pending()
            return PumpResult(published, retried, dropped)

    def _envelope(self, entry: OutboxEntry) -> pb.BusEnvelope:
        message = self._store.parse_stored(
            _MESSAGE_TYPES[entry.kind], entry.payload, f"outbox {entry.ref_id}"
        )
        return envelope_for(
            message,
            trace_id=entry.command_id,
            attributes={"command_id": entry.command_id, "ref_id": entry.ref_id, "kind": entry.kind},
            clock=self._clock,
        )

    def _failed(self, entry: OutboxEntry, error: str) -> bool:
        """Schedule a retry (True) or drop the entry past the limit (False)."""
        if self.backoff.exhausted(entry.attempts):
            self._drop(entry, f"retry limit {self.backoff.max_retries} reached; last error: {error}")
            return False
        delay_ms = self.backoff.delay_ms(entry.attempts, self._rng)
        attempts = entry.attempts + 1
        self._store.schedule_retry(entry, attempts, self._clock.wall_ns() + int(delay_ms * 1e6), error)
        self._events(
            "field_report_retry",
            f"{entry.kind} {entry.ref_id} not published (attempt {attempts}): {error}; "
            f"retrying in {delay_ms:.0f} ms",
            **{
                "kind": entry.kind,
                "ref_id": entry.ref_id,
                "command_id": entry.command_id,
                "attempt": str(attempts),
                "delay_ms": f"{delay_ms:.1f}",
                "error": error,
            },
        )
        return True

    def _drop(self, entry: OutboxEntry, reason: str) -> None:
        attempts = entry.attempts + 1
        self._store.mark_dropped(entry, attempts, reason)
        if entry.kind == "field_report":
            self.metrics.dropped.inc()
        else:
            self.metrics.decisions_dropped.inc()
        self._events(
            "field_report_drop",
            f"{entry.kind} {entry.ref_id} dropped after {attempts} attempt(s): {reason}",
            **{
                "kind": entry.kind,
                "ref_id": entry.ref_id,
                "command_id": entry.command_id,
                "attempts": str(attempts),
                "reason": reason,
            },
        )


class OutboxPublisher:
    """Runs `FieldReportOutbox.pump()` on a background thread: woken by `notify()`, else when due.

    The thread outlives any failure of a pass (the store's, or an unexpected one from the bus client):
    each is a `field_report_outbox_failed` event and a count in `pass_failures`, and the next pass runs
    after the poll interval; entries that were not published stay pending in the store.
    """

    def __init__(
        self,
        outbox: FieldReportOutbox,
        events: EventSink,
        *,
        poll_s: float = 1.0,
    ) -> None:
        self._outbox = outbox
        self._events = events
        self._poll_s = poll_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tamiyo-outbox", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        """Something new is queued: publish it now."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            wait_s = self._poll_s
            try:
                result = self._outbox.pump()
                if result.attempted and result.attempted >= self._outbox.batch:
                    continue  # a full batch: more may be due right away
                due = self._outbox.seconds_until_due()
                if due is not None:
                    wait_s = min(wait_s, due)
            except Exception as exc:  # noqa: BLE001 (the thread outlives any pass: event, metric, retried)
                self._pass_failed(exc)
            self._wake.wait(wait_s)
            self._wake.clear()

    def _pass_failed(self, exc: Exception) -> None:
        # Nothing is lost: what was not published is still pending in the store for the next pass.
        error = f"{type(exc).__name__}: {exc}"
        self._outbox.metrics.pass_failures.inc()
        unexpected = "" if isinstance(exc, EsperError) else " (unexpected error)"
        self._events(
            "field_report_outbox_failed",
            f"outbox pass failed{unexpected}: {error}; pending entries are retried on the next pass",
            **{"error": error},
        )

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the thread (after its current pass); raises `OutboxPublisherStuck` if it does not stop."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise OutboxPublisherStuck(timeout_s)


class OutboxPublisherStuck(EsperError):
    """The publisher thread did not stop in time (a bus call is hanging)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        super().__init__(f"outbox publisher did not stop within {timeout_s:.1f} s (a bus call is hanging)")
