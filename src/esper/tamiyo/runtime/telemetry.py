# Over 500 lines: the event table and the one telemetry class that every Tamiyo event goes through.
"""Tamiyo's telemetry (P5): one table of events, Prometheus metrics, health, blend annotations (P8).

`EVENTS` is the only place an event's level and priority are decided. Events are `pb.TelemetryEvent`s,
collected into a `pb.TelemetryPacket` with metrics and health; a sink (the bus) receives each packet, and
every event is also logged at its level so nothing disappears when no sink is wired. Prometheus metrics
live in a per-service `CollectorRegistry`, never the global one.

Publishing never holds up a decision: with `background=True` (what the service uses) `flush()` only hands
the packet to a bounded queue that a `QueuedSink` thread drains into the sink. When the queue is full the
packet is dropped and counted (`tamiyo_telemetry_dropped`), and a `telemetry_dropped` event travels in the
next packet that gets through; a sink that raises is counted and reported the same way.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from esper.leyline import Clock, EsperError, pb, short_name
from esper.leyline.events import LOG_LEVELS, EventSpec
from esper.tamiyo.model.graph import GraphCoverage
from esper.tamiyo.model.proposal import Proposal
from esper.tamiyo.settings import TamiyoSettings

_log = logging.getLogger("esper.tamiyo")


EVENTS: dict[str, EventSpec] = {
    "decision_deadline_exceeded": EventSpec(pb.TELEMETRY_LEVEL_CRITICAL, pb.MESSAGE_PRIORITY_CRITICAL),
    "policy_inference_failed": EventSpec(pb.TELEMETRY_LEVEL_ERROR, pb.MESSAGE_PRIORITY_HIGH),
    "command_build_failed": EventSpec(pb.TELEMETRY_LEVEL_ERROR, pb.MESSAGE_PRIORITY_HIGH),
    "worker_saturated": EventSpec(pb.TELEMETRY_LEVEL_CRITICAL, pb.MESSAGE_PRIORITY_CRITICAL),
    "worker_realtime_unavailable": EventSpec(pb.TELEMETRY_LEVEL_WARNING, pb.MESSAGE_PRIORITY_HIGH),
    "anticipation_failed": EventSpec(pb.TELEMETRY_LEVEL_WARNING, pb.MESSAGE_PRIORITY_NORMAL),
    "normalizer_flush_failed": EventSpec(pb.TELEMETRY_LEVEL_ERROR, pb.MESSAGE_PRIORITY_HIGH),
    "tamiyo_store_records_lost": EventSpec(pb.TELEMETRY_LEVEL_CRITICAL, pb.MESSAGE_PRIORITY_CRITICAL),
    "tamiyo_store_record_corrupt": EventSpec(pb.TELEMETRY_LEVEL_ERROR, pb.MESSAGE_PRIORITY_HIGH),
    "tamiyo_store_mark_failed": EventSpec(pb.TELEMETRY_LEVEL_ERROR, pb.MESSAGE_PRIORITY_HIGH),
    "gnn_compile_fallback": EventSpec(pb.TELEMETRY_LEVEL_WARNING, pb.MESSAGE_PRIORITY_HIGH),
    "gnn_compile_disabled": EventSpec(pb.TELEMETRY_LEVEL_INFO, pb.MESSAGE_PRIORITY_LOW),
    "gnn_compile_warm": EventSpec(pb.TELEMETRY_LEVEL_INFO, pb.MESSAGE_PRIORITY_LOW),
    "gnn_plan_built": EventSpec(pb.TELEMETRY_LEVEL_INFO, pb.MESSAGE_PRIORITY_LOW),
    "gnn_plan_fallback": EventSpec(pb.TELEMETRY_LEVEL_WARNING, pb.MESSAGE_PRIORITY_HIGH),
    "gnn_cuda_graph_captured": EventSpec(pb.TELEMETRY_LEVEL_INFO, pb.MESSAGE_PRIORITY_LOW),
    "gnn_cuda_graph_unavailable": EventSpec(pb.TELEMETRY_LEVEL_INFO, pb.MESSAGE_PRIORITY_LOW),
    "gnn_cuda_graph_fallback": EventSpec(pb.TELEMETRY_LEVEL_WARNING, pb.MESSAGE_PRIORITY_HIGH),
    "graph_missing_features": EventSpec(pb.TELEMETRY_LEVEL_WARNING, pb.MESSAGE_PRIORITY_NORMAL),
    "graph_nodes_dropped": EventSpec(pb.TELEMETRY_LEVEL_WARNING, pb.MESSAGE_PRIORITY_NORMAL),
    "graph_seed_unlinked": EventSpec(pb.TELEMETRY_LEVEL_WARNING, pb.MESSAGE_PRIORITY_NORMAL),
    "risk_gate_override": EventSpec(pb.TELEMETRY_LEVEL_INFO, pb.MESSAGE_PRIORITY_NORMAL),
    "step_over_budget": EventSpec(pb.TELEMETRY_LEVEL_WARNING, pb.MESSAGE_PRIORITY_HIGH),
    "policy_over_budget": EventSpec(pb.TELEMETRY_LEVEL_WARNING, pb.MESSAGE_PRIORITY_HIGH),
    "blueprint_metadata_unavailable": EventSpec(pb.TELEMETRY_LEVEL_WARNING, pb.MESSAGE_PRIORITY_NORMAL),
    "telemetry_dropped": EventSpec(pb.TELEMETRY_LEVEL_WARNING, pb.MESSAGE_PRIORITY_HIGH),
    "telemetry_publish_failed": EventSpec(pb.TELEMETRY_LEVEL_ERROR, pb.MESSAGE_PRIORITY_HIGH),
    # P9: field-report lifecycle and outbox.
    "field_report_synthesised": EventSpec(pb.TELEMETRY_LEVEL_INFO, pb.MESSAGE_PRIORITY_LOW),
    "field_report_retry": EventSpec(pb.TELEMETRY_LEVEL_WARNING, pb.MESSAGE_PRIORITY_NORMAL),
    "field_report_drop": EventSpec(pb.TELEMETRY_LEVEL_WARNING, pb.MESSAGE_PRIORITY_HIGH),
    "field_report_outbox_unwired": EventSpec(pb.TELEMETRY_LEVEL_WARNING, pb.MESSAGE_PRIORITY_NORMAL),
    "field_report_outbox_failed": EventSpec(pb.TELEMETRY_LEVEL_ERROR, pb.MESSAGE_PRIORITY_HIGH),
    "tamiyo_store_write_failed": EventSpec(pb.TELEMETRY_LEVEL_ERROR, pb.MESSAGE_PRIORITY_HIGH),
    "tamiyo_store_retention": EventSpec(pb.TELEMETRY_LEVEL_INFO, pb.MESSAGE_PRIORITY_LOW),
    # P3: policy-update intake.
    "policy_update_accepted": EventSpec(pb.TELEMETRY_LEVEL_INFO, pb.MESSAGE_PRIORITY_NORMAL),
    "policy_update_rejected": EventSpec(pb.TELEMETRY_LEVEL_WARNING, pb.MESSAGE_PRIORITY_HIGH),
    "policy_rolled_back": EventSpec(pb.TELEMETRY_LEVEL_ERROR, pb.MESSAGE_PRIORITY_HIGH),
    "policy_feed_unavailable": EventSpec(pb.TELEMETRY_LEVEL_WARNING, pb.MESSAGE_PRIORITY_HIGH),
    "policy_feed_recovered": EventSpec(pb.TELEMETRY_LEVEL_INFO, pb.MESSAGE_PRIORITY_NORMAL),
}

TelemetrySink = Callable[[pb.TelemetryPacket], None]


class UnknownTelemetryEvent(EsperError):
    """An event name that is not in `EVENTS` (every event must have a level and a priority)."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"telemetry event {name!r} is not declared in EVENTS")


@dataclass(frozen=True)
class QueueClosed:
    """What closing a `QueuedSink` left behind: packets delivered, dropped (full queue, or still queued
    when the bound ran out) and failed (the sink raised), over the sink's whole life."""

    delivered: int
    dropped: int
    failed: int
    stuck: bool  # the sink was still busy with a packet when the bound ran out


class QueuedSink:
    """A bounded queue in front of a sink, drained by a background thread: `offer` never waits.

    Thread-safe counters (`dropped`, `failed`, `delivered`) say what became of the packets; the owner
    reports them (events are never raised from the publisher thread).
    """

    def __init__(self, sink: TelemetrySink, capacity: int, *, name: str = "tamiyo-telemetry") -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._sink = sink
        self._queue: queue.Queue[pb.TelemetryPacket | None] = queue.Queue(maxsize=capacity)
        self._lock = threading.Lock()
        self._closed = False
        self.dropped = 0
        self.failed = 0
        self.delivered = 0
        self.last_error = ""
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def offer(self, packet: pb.TelemetryPacket) -> bool:
        """Queue `packet` for the sink; False (and counted as dropped) when the queue is full or closed."""
        with self._lock:
            if not self._closed:
                try:
                    self._queue.put_nowait(packet)
                    return True
                except queue.Full:
                    pass
            self.dropped += 1
            return False

    def _run(self) -> None:
        while True:
            packet = self._queue.get()
            try:
                if packet is None:
                    return
                try:
                    self._sink(packet)
                except Exception as exc:  # noqa: BLE001 (counted and reported as an event; the thread goes on)
                    with self._lock:
                        self.failed += 1
                        self.last_error = f"{type(exc).__name__}: {exc}"
                    _log.error("telemetry packet %s not published: %s", packet.packet_id, self.last_error)
                else:
                    with self._lock:
                        self.delivered += 1
            finally:
                self._queue.task_done()

    def drain(self, timeout_s: float) -> bool:
        """Wait until every queued packet went through the sink; False if `timeout_s` ran out first."""
        deadline = time.monotonic() + timeout_s
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._queue.all_tasks_done.wait(remaining)
        return True

    def close(self, timeout_s: float) -> QueueClosed:
        """Deliver what can be delivered within `timeout_s`, then stop; what is left is dropped, counted,
        and logged as a warning with the totals. Later offers are dropped."""
        with self._lock:
            self._closed = True
        stuck = not self.drain(timeout_s)
        left = 0
        while True:  # only when stuck: what the sink will never get to
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            self._queue.task_done()
            left += item is not None
        self._queue.put(None)  # room for it: the queue was just emptied and nothing can be added
        if not stuck:
            self._thread.join(timeout_s)
        with self._lock:
            self.dropped += left
            closed = QueueClosed(self.delivered, self.dropped, self.failed, stuck)
        if closed.dropped or closed.failed or stuck:
            _log.warning(
                "telemetry publisher closed: %d packet(s) delivered, %d dropped (%d still queued at "
                "close%s), %d failed in the sink",
                closed.delivered,
                closed.dropped,
                left,
                ", the sink was blocked" if stuck else "",
                closed.failed,
            )
        return closed


class TamiyoTelemetry:
    """Events, metrics and health of one service."""

    def __init__(
        self,
        settings: TamiyoSettings,
        clock: Clock,
        *,
        sink: TelemetrySink | None = None,
        registry: CollectorRegistry | None = None,
        max_buffered: int = 1024,
        step_budget_ms: float | None = None,
        background: bool = False,
    ) -> None:
        self._clock = clock
        self._sink = sink
        self._settings = settings
        self._queued = (
            QueuedSink(sink, settings.telemetry_queue_size) if sink is not None and background else None
        )
        self._reported_drops = 0
        self._reported_failures = 0
        self._events: deque[pb.TelemetryEvent] = deque(maxlen=max_buffered)
        self._events_lock = threading.Lock()  # events may come from other threads (the metadata cache's)
        self._indicators: dict[str, float] = {
            "step_timeout_ms": settings.step_timeout_ms if step_budget_ms is None else step_budget_ms,
            "metadata_timeout_ms": settings.metadata_timeout_ms,
            "last_latency_ms": float("nan"),
            "deadline_misses": 0.0,
            "compile_enabled": 0.0,
            "compile_fallbacks": 0.0,
            "plan_enabled": 0.0,
            "worker_realtime": 0.0,
        }
        self._compile_reason = "not started"
        self._plan_reason = "no topology rehearsed yet"
        self._last_missing: dict[str, tuple[str, ...]] = {}
        self._last_unlinked: dict[str, str] = {}
        self.registry = registry or CollectorRegistry()
        self.latency_ms = Histogram(
            "tamiyo_step_latency_ms",
            "evaluate_step latency (graph, inference, risk, signing)",
            buckets=(0.5, 1, 2, 3, 4, 5, 7.5, 10, 20, 50, 100),
            registry=self.registry,
        )
        self.decisions = Counter(
            "tamiyo_decisions", "Commands issued, by final action", ["action"], registry=self.registry
        )
        self.overrides = Counter(
            "tamiyo_risk_overrides", "Risk gate overrides", ["gate"], registry=self.registry
        )
        self.coverage = Gauge(
            "tamiyo_graph_coverage",
            "Fraction of graph features present",
            ["node_type"],
            registry=self.registry,
        )
        self.compile_warm_ms = Gauge(
            "tamiyo_gnn_compile_warm_ms", "GNN compile warm-up", registry=self.registry
        )
        self.compile_fallbacks = Counter(
            "tamiyo_gnn_compile_fallback", "GNN compile fallbacks to eager", registry=self.registry
        )
        self.plan_build_ms = Gauge(
            "tamiyo_gnn_plan_build_ms",
            "Tracing the GNN's inference path for a topology",
            registry=self.registry,
        )
        self.plan_fallbacks = Counter(
            "tamiyo_gnn_plan_fallback",
            "Topologies whose traced plan failed (dense path serves)",
            registry=self.registry,
        )
        self.cuda_graph_fallbacks = Counter(
            "tamiyo_gnn_cuda_graph_fallback",
            "Topologies whose CUDA graph capture failed (the plan or the dense path serves)",
            registry=self.registry,
        )
        self.deadline_misses = Counter(
            "tamiyo_deadline_misses", "Decisions that missed the deadline", registry=self.registry
        )
        self.warmups_ahead = Counter(
            "tamiyo_warmups_ahead",
            "Warm-ups ahead of a decision (anticipate), by outcome: completed, cut_short (the decision "
            "came first), failed, skipped (the worker was busy)",
            ["outcome"],
            registry=self.registry,
        )
        self.dropped = Counter(
            "tamiyo_telemetry_dropped",
            "Telemetry packets dropped: the publishing queue was full, or still held them at close",
            registry=self.registry,
        )
        self.publish_failures = Counter(
            "tamiyo_telemetry_publish_failures",
            "Telemetry packets the sink raised on",
            registry=self.registry,
        )
        self._metric_points: dict[str, tuple[float, str]] = {}

    @property
    def step_budget_ms(self) -> float:
        """The step budget health judges the last latency against (the service's resolved one)."""
        return self._indicators["step_timeout_ms"]

    @step_budget_ms.setter
    def step_budget_ms(self, value: float) -> None:
        self._indicators["step_timeout_ms"] = value

    @property
    def has_sink(self) -> bool:
        """True when packets are handed to a sink (otherwise they wait in the buffer for `flush()`)."""
        return self._sink is not None

    # -- events -------------------------------------------------------------------------------------

    def emit(self, name: str, description: str, /, **attributes: str) -> pb.TelemetryEvent:
        """Record event `name` at the level of the table, log it, and return it."""
        spec = EVENTS.get(name)
        if spec is None:
            raise UnknownTelemetryEvent(name)
        event = pb.TelemetryEvent(name=name, description=description, level=spec.level)
        event.attributes.update(attributes)
        with self._events_lock:
            self._events.append(event)
        _log.log(LOG_LEVELS[spec.level], "%s: %s %s", name, description, attributes or "")
        return event

    def metric(self, name: str, value: float, unit: str = "") -> None:
        """Set metric point `name` (dotted name, as in the brief) for the next packet."""
        self._metric_points[name] = (value, unit)

    # -- what the service reports -------------------------------------------------------------------

    def record_decision(self, proposal: Proposal, latency_ms: float) -> None:
        """Latency and final action of one issued command."""
        self.latency_ms.observe(latency_ms)
        self.decisions.labels(action=short_name(pb.PolicyAction, proposal.action)).inc()
        self._indicators["last_latency_ms"] = latency_ms
        self.metric("tamiyo.step.latency_ms", latency_ms, "ms")

    def record_deadline_miss(self, budget_ms: float, elapsed_ms: float, packet_id: str) -> None:
        """A CRITICAL event and the counter; the caller re-raises."""
        self.deadline_misses.inc()
        self._indicators["deadline_misses"] += 1
        self._indicators["last_latency_ms"] = elapsed_ms
        self.emit(
            "decision_deadline_exceeded",
            f"decision for packet {packet_id} missed its {budget_ms:.2f} ms deadline",
            packet_id=packet_id,
            budget_ms=f"{budget_ms:.3f}",
            elapsed_ms=f"{elapsed_ms:.3f}",
        )

    def record_coverage(self, coverage: GraphCoverage, packet_id: str) -> None:
        """Coverage gauges every time; an event naming the missing keys, and one naming the active seeds
        without a blueprint node, whenever that set changes."""
        for node_type, fraction in coverage.present_fraction.items():
            self.coverage.labels(node_type=node_type).set(fraction)
            self.metric(f"tamiyo.graph.coverage.{node_type}", fraction)
        if coverage.missing != self._last_missing:
            if coverage.missing:
                keys = "; ".join(f"{k}: {', '.join(v)}" for k, v in coverage.missing.items())
                self.emit(
                    "graph_missing_features",
                    f"packet {packet_id} lacks {keys}",
                    packet_id=packet_id,
                    missing=keys,
                )
            self._last_missing = dict(coverage.missing)
        self.metric("tamiyo.graph.unlinked_seeds", float(len(coverage.unlinked_seeds)))
        if coverage.unlinked_seeds != self._last_unlinked:
            if coverage.unlinked_seeds:
                unlinked = "; ".join(
                    f"{slot}: {why}" for slot, why in sorted(coverage.unlinked_seeds.items())
                )
                self.emit(
                    "graph_seed_unlinked",
                    f"packet {packet_id} has active seeds without a blueprint node: {unlinked}",
                    packet_id=packet_id,
                    slots=",".join(sorted(coverage.unlinked_seeds)),
                    unlinked=unlinked,
                )
            self._last_unlinked = dict(coverage.unlinked_seeds)
        dropped = {k: v for k, v in coverage.dropped_nodes.items() if v}
        if dropped:
            cut_edges = {k: v for k, v in coverage.dropped_edges.items() if v}
            self.emit(
                "graph_nodes_dropped",
                f"caps cut nodes {dropped} and edges {cut_edges}",
                packet_id=packet_id,
                **{f"dropped_{k}": str(v) for k, v in dropped.items()},
            )

    def record_compile(self, enabled: bool, reason: str, warm_ms: float, fallbacks: int) -> None:
        """Compile state (P2): warm-up metric, fallback counter, and the reason compile is off."""
        previous = int(self._indicators["compile_fallbacks"])
        if fallbacks > previous:
            self.compile_fallbacks.inc(fallbacks - previous)
            self.emit("gnn_compile_fallback", f"GNN runs eager: {reason}", reason=reason)
        elif enabled:
            self.compile_warm_ms.set(warm_ms)
            self.emit("gnn_compile_warm", f"GNN compiled, warm-up {warm_ms:.1f} ms", warm_ms=f"{warm_ms:.1f}")
        else:
            self.emit("gnn_compile_disabled", f"GNN runs eager: {reason}", reason=reason)
        self.metric("tamiyo.gnn.compile_warm_ms", warm_ms, "ms")
        self._indicators["compile_enabled"] = float(enabled)
        self._indicators["compile_fallbacks"] = float(fallbacks)
        self._compile_reason = reason

    def record_plan(self, enabled: bool, reason: str, build_ms: float, *, failed: bool) -> None:
        """A rehearsal's outcome for the traced plan: built (with its cost) or failed (with the reason; the
        dense path serves, a HIGH-priority event says so)."""
        if failed:
            self.plan_fallbacks.inc()
            self.emit("gnn_plan_fallback", f"GNN runs its untraced dense path: {reason}", reason=reason)
        elif enabled:
            self.plan_build_ms.set(build_ms)
            self.emit(
                "gnn_plan_built",
                f"GNN inference traced for this topology in {build_ms:.0f} ms",
                build_ms=f"{build_ms:.1f}",
            )
            self.metric("tamiyo.gnn.plan_build_ms", build_ms, "ms")
        self._indicators["plan_enabled"] = float(enabled)
        self._plan_reason = reason

    def record_cuda_graph(self, enabled: bool, reason: str, capture_ms: float, *, failed: bool) -> None:
        """A rehearsal's outcome for the CUDA graph (P7): captured (with its cost), not available (not on
        CUDA), or failed (a HIGH-priority event; the plan or the dense path serves)."""
        if failed:
            self.cuda_graph_fallbacks.inc()
            self.emit(
                "gnn_cuda_graph_fallback", f"GNN decisions run without a CUDA graph: {reason}", reason=reason
            )
        elif enabled:
            self.emit(
                "gnn_cuda_graph_captured",
                f"GNN decision forward captured in a CUDA graph in {capture_ms:.0f} ms",
                capture_ms=f"{capture_ms:.1f}",
            )
            self.metric("tamiyo.gnn.cuda_graph_capture_ms", capture_ms, "ms")
        else:
            self.emit(
                "gnn_cuda_graph_unavailable",
                f"GNN decisions run without a CUDA graph: {reason}",
                reason=reason,
            )
        self._indicators["cuda_graph_enabled"] = float(enabled)

    def record_scheduling(self, priority: int, applied: bool, reason: str) -> None:
        """The inference thread's scheduling: an indicator, and a HIGH-priority event when the real-time
        priority that was asked for could not be had (decisions then wait behind other tasks)."""
        self._indicators["worker_realtime"] = float(bool(priority) and applied)
        if priority and not applied:
            self.emit(
                "worker_realtime_unavailable",
                f"the inference thread runs at normal priority, not SCHED_FIFO {priority}: {reason} (grant "
                "CAP_SYS_NICE or an RLIMIT_RTPRIO allowance, or set TAMIYO_REALTIME_PRIORITY=0)",
                reason=reason,
            )

    def health(self, events: list[pb.TelemetryEvent] | None = None) -> pb.SystemHealth:
        """Health with the timeout budgets, last latency and compile state as indicators."""
        indicators = self._indicators
        status = pb.HEALTH_STATUS_HEALTHY
        summary = "deciding within budget"
        last = indicators["last_latency_ms"]
        if not math.isnan(last) and last > indicators["step_timeout_ms"]:  # unmeasured is not "over"
            status, summary = pb.HEALTH_STATUS_DEGRADED, f"last decision took {last:.2f} ms"
        if events is None:
            with self._events_lock:
                events = list(self._events)
        if any(event.level == pb.TELEMETRY_LEVEL_CRITICAL for event in events):
            status, summary = pb.HEALTH_STATUS_CRITICAL, "a decision failed critically since the last report"
        health = pb.SystemHealth(
            status=status, summary=f"{summary}; compile: {self._compile_reason}; plan: {self._plan_reason}"
        )
        health.indicators.update(indicators)
        return health

    def flush(self, training_run_id: str = "") -> pb.TelemetryPacket:
        """Everything since the last flush as one packet, handed to the sink (if any) and returned."""
        if self._queued is not None:
            self._account_queue()  # what became of earlier packets travels in this one
        with self._events_lock:
            events = list(self._events)
            self._events.clear()
        packet = pb.TelemetryPacket(
            packet_id=f"tel-{uuid.uuid4().hex}",
            source_subsystem="tamiyo",
            training_run_id=training_run_id,
        )
        packet.timestamp.FromNanoseconds(self._clock.wall_ns())
        packet.system_health.CopyFrom(self.health(events))
        packet.events.extend(events)
        for name, (value, unit) in self._metric_points.items():
            packet.metrics.add(name=name, value=value, unit=unit)
        levels = [spec.level for spec in (EVENTS[e.name] for e in events)] or [pb.TELEMETRY_LEVEL_INFO]
        priorities = [EVENTS[e.name].priority for e in events] or [pb.MESSAGE_PRIORITY_NORMAL]
        packet.level = max(levels)
        packet.priority = max(priorities)
        if self._queued is not None:
            if not self._queued.offer(packet):
                # Its events go again with the next packet (the buffer is bounded), which reports the drop.
                with self._events_lock:
                    self._events.extendleft(reversed(events))
            self._account_queue()
        elif self._sink is not None:
            self._sink(packet)
        return packet

    def _account_queue(self) -> None:
        """Turn the publisher's new drops and failures into counters, metric points and one event each."""
        queued = self._queued
        assert queued is not None
        dropped, failed, error = queued.dropped, queued.failed, queued.last_error
        if dropped > self._reported_drops:
            new = dropped - self._reported_drops
            self._reported_drops = dropped
            self.dropped.inc(new)
            self.metric("tamiyo.telemetry.dropped_total", float(dropped))
            self.emit(
                "telemetry_dropped",
                f"{new} telemetry packet(s) dropped: the publishing queue "
                f"({self._settings.telemetry_queue_size}) is full; {dropped} in total",
                dropped=str(new),
                dropped_total=str(dropped),
            )
        if failed > self._reported_failures:
            new = failed - self._reported_failures
            self._reported_failures = failed
            self.publish_failures.inc(new)
            self.emit(
                "telemetry_publish_failed",
                f"{new} telemetry packet(s) not published: {error}",
                failed=str(new),
                error=error,
            )

    def drain(self, timeout_s: float = 10.0) -> bool:
        """Wait until the packets flushed so far went through the sink (True), or `timeout_s` ran out.

        Nothing to wait for without a background publisher. Decisions never call this; tests and
        shutdown do."""
        return True if self._queued is None else self._queued.drain(timeout_s)

    def close(self, timeout_s: float | None = None) -> QueueClosed | None:
        """Stop the background publisher after delivering what it can within `timeout_s`
        (`TAMIYO_TELEMETRY_CLOSE_TIMEOUT_S` by default); returns what it delivered and dropped (logged as a
        warning when anything was lost). None without a background publisher."""
        if self._queued is None:
            return None
        bound = self._settings.telemetry_close_timeout_s if timeout_s is None else timeout_s
        return self._queued.close(bound)


class BlendAnnotator:
    """P8: blend-mode annotations for GERMINATE commands, resolved once from settings."""

    def __init__(self, settings: TamiyoSettings) -> None:
        self.enabled = settings.enable_blend_mode_ann
        common = {"alpha_lo": f"{settings.blend_alpha_lo:g}", "alpha_hi": f"{settings.blend_alpha_hi:g}"}
        self._per_mode: dict[int, dict[str, str]] = {
            pb.BLEND_MODE_CONVEX: {},
            pb.BLEND_MODE_RESIDUAL: {},
            pb.BLEND_MODE_CHANNEL: {"channel_alpha_init": f"{settings.blend_channel_alpha_init:g}"},
            pb.BLEND_MODE_CONFIDENCE: {
                "gate_k": f"{settings.blend_gate_k:g}",
                "gate_tau": f"{settings.blend_gate_tau:g}",
                **common,
            },
        }

    def annotations(self, proposal: Proposal) -> dict[str, str]:
        """Annotations for `proposal` (empty unless enabled and GERMINATE)."""
        if not self.enabled or proposal.action != pb.POLICY_ACTION_GERMINATE:
            return {}
        notes = {
            "blend_mode": short_name(pb.BlendMode, proposal.blend_mode),
            "alpha_ramp_steps": str(proposal.alpha_ramp_steps),
        }
        notes.update({f"blend_{k}": v for k, v in self._per_mode.get(proposal.blend_mode, {}).items()})
        return notes
