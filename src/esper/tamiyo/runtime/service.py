# Over 500 lines: one class, the decision path, whose steps share one worker, one budget and one telemetry.
"""TamiyoService: routes one packet through the components and returns one signed command.

validate -> graph (for a graph policy) -> policy on the inference worker, under the step deadline ->
risk gates -> command factory (signing) -> telemetry. The service computes nothing itself. Settings are
resolved once by the caller and passed in; nothing here reads the environment. `evaluate_step` is the only
entry point; a failure (deadline, inference, invalid packet) reaches the caller as a typed error, never as
a synthetic PAUSE.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from esper.leyline import (
    SYSTEM_CLOCK,
    Clock,
    ContractViolation,
    EsperError,
    MalformedMessage,
    pb,
    validate_packet,
)
from esper.oona import Bus
from esper.tamiyo.model.graph import GraphCoverage
from esper.tamiyo.model.normalizer import NormalizerWriteError
from esper.tamiyo.model.proposal import (
    GraphPolicy,
    Policy,
    PolicyInferenceError,
    Proposal,
)
from esper.tamiyo.model.schema import BlueprintLookup
from esper.tamiyo.records.field_reports import FieldReports
from esper.tamiyo.records.store import TamiyoStore
from esper.tamiyo.runtime.commands import CommandBuildError, CommandFactory, blend_parameters
from esper.tamiyo.runtime.metadata import BlueprintMetadataCache
from esper.tamiyo.runtime.risk import RiskContext, RiskDecision, RiskGates
from esper.tamiyo.runtime.telemetry import BlendAnnotator, TamiyoTelemetry, TelemetrySink
from esper.tamiyo.runtime.worker import (
    BackgroundJob,
    CancelToken,
    DeadlineExceeded,
    InferenceWorker,
    PendingJob,
    Scheduling,
    WorkerSaturated,
    WorkerSchedulingError,
    raise_priority,
)
from esper.tamiyo.settings import TamiyoSettings

_log = logging.getLogger("esper.tamiyo")


@dataclass(frozen=True)
class Decision:
    """The last decision: what the policy proposed, what the gates made of it, and the command."""

    proposal: Proposal
    risk: RiskDecision
    command: pb.AdaptationCommand
    latency_ms: float
    policy_version: str


# Timed runs of the graph build and the network when `prepare` measures the policy on this machine.
PROBE_RUNS = 16


@dataclass(frozen=True)
class PolicyFit:
    """What `prepare` measured: the graph build and the network on the inference worker, the second
    slowest of `runs` runs (one outlier forgiven), against the share of the step budget they may take."""

    measured_ms: float
    allowed_ms: float
    budget_ms: float
    runs: int
    policy_size: str

    @property
    def fits(self) -> bool:
        """Whether decisions can be expected to meet the step budget on this machine."""
        return self.measured_ms <= self.allowed_ms

    @property
    def message(self) -> str:
        """What was measured and what to do about it (for the event and the operator's terminal)."""
        # The budget in which the measured figure takes the allowed share, rounded up to half a millisecond.
        needed = math.ceil(round(self.measured_ms * self.budget_ms / self.allowed_ms * 2, 6)) / 2
        smaller = "use the smaller policy (TAMIYO_POLICY_SIZE=default), "
        if self.policy_size == "default":
            smaller = ""
        return (
            f"the {self.policy_size} GNN policy takes {self.measured_ms:.2f} ms per decision on this machine "
            f"(graph build and network, second slowest of {self.runs} runs), more than the "
            f"{self.allowed_ms:.3g} ms it may take of the {self.budget_ms:g} ms step budget: decisions will "
            f"miss their deadline. Raise the budget (TAMIYO_STEP_TIMEOUT_MS={needed:g} or more), {smaller}"
            "run on a GPU (TAMIYO_DEVICE=cuda), or use --policy heuristic"
        )


@dataclass(frozen=True)
class _Inference:
    proposal: Proposal
    coverage: GraphCoverage | None


@dataclass(frozen=True)
class _InFlight:
    packet: pb.SystemStatePacket
    pending: PendingJob[_Inference]


class PolicyUpdates(Protocol):
    """Policy updates, an input the service consults between decisions (`PolicyUpdateIntake`)."""

    def between_decisions(self) -> bool:
        """Take the updates that arrived; True when another policy decides from now on."""
        ...

    def judge(self, failure: str) -> None:
        """Count one decision's outcome ("" for a success) against a fresh policy's probation."""
        ...

    def export_state(self) -> dict[str, Any]:
        """The serving policy's run state and the lineage, JSON-ready."""
        ...

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Continue from `export_state()`."""
        ...


class DecisionInFlight(EsperError):
    """A decision was submitted and not collected; the service takes one decision at a time."""

    def __init__(self, packet_id: str) -> None:
        self.packet_id = packet_id
        super().__init__(f"the decision for {packet_id} is still in flight: collect it first")


@contextmanager
def _collections_deferred() -> Iterator[None]:
    """Python's cyclic garbage collector paused for one decision, and run after it if it is due.

    Measured in `esper run --policy gnn`: a generation-1 pass takes about 1 ms (up to 1.8) and happens
    every few decisions' worth of allocations, a full pass 90-150 ms; either one landing inside a
    decision is a deadline miss that has nothing to do with the policy. Paused, the collector keeps
    counting allocations and collects on the first allocation after the decision. (Process-wide: the
    inference worker's thread is covered too. A caller that disabled collection itself is left alone.)
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class TamiyoService:
    """The controller a trainer talks to: one signed command per state packet."""

    def __init__(
        self,
        settings: TamiyoSettings,
        policy: Policy,
        secret: bytes,
        *,
        clock: Clock = SYSTEM_CLOCK,
        step_timeout_ms: float | None = None,
        blueprint_metadata: BlueprintLookup | None = None,
        telemetry_sink: TelemetrySink | None = None,
        registry: CollectorRegistry | None = None,
        store: TamiyoStore | None = None,
        bus: Bus | None = None,
        hold_until_checkpoint: bool = False,
    ) -> None:
        self.settings = settings
        # With a store: a run's records leave only once its trainer says a checkpoint covers them
        # (`checkpointed`); without, at once (a service no trainer drives).
        self._hold_until_checkpoint = hold_until_checkpoint
        self._clock = clock  # latency is measured on it (its monotonic time)
        # P1: one budget, resolved here, feeds the worker's deadline, the latency gate and health.
        budget = settings.step_timeout_ms if step_timeout_ms is None else step_timeout_ms
        _check_budget(budget)
        self._step_timeout_ms = budget
        self._policy = policy
        self._graph_policy = policy if isinstance(policy, GraphPolicy) else None
        self._commands = CommandFactory(secret, clock, blend_parameters=blend_parameters(settings))
        self._blend = BlendAnnotator(settings)
        # Packets go to the sink from a background thread: publishing never holds up a decision.
        self.telemetry = TamiyoTelemetry(
            settings, clock, sink=telemetry_sink, registry=registry, step_budget_ms=budget, background=True
        )
        self._risk = RiskGates(settings, blueprint_metadata, step_budget_ms=budget)
        if isinstance(blueprint_metadata, BlueprintMetadataCache):
            # Catalogue failures (a fetch timeout, lost notifications) are this service's events.
            blueprint_metadata.emit_to(self.telemetry.emit)
        if store is not None:  # damaged records and lost writes are this service's events too
            store.emit_to(self.telemetry.emit)
        self._field_reports: FieldReports | None = None
        self.policy_fit: PolicyFit | None = None  # the last measurement of `prepare`
        self._ahead: BackgroundJob | None = None  # the warm-up `anticipate` started, until accounted for
        self._in_flight: _InFlight | None = None  # the decision `submit` started, until collected
        self._updates: PolicyUpdates | None = None  # consulted between decisions (`consult`)
        try:
            self._start(
                settings=settings,
                policy=policy,
                clock=clock,
                blueprint_metadata=blueprint_metadata,
                store=store,
                bus=bus,
            )
        except BaseException as exc:
            # Nothing started may outlive a failed construction: the worker's threads, the telemetry
            # publisher, the outbox thread. Their own failures are logged beside this one.
            self._close_parts(abort_open_windows=False, cause=exc)
            raise

    def _start(
        self,
        *,
        settings: TamiyoSettings,
        policy: Policy,
        clock: Clock,
        blueprint_metadata: BlueprintLookup | None,
        store: TamiyoStore | None,
        bus: Bus | None,
    ) -> None:
        self._worker = InferenceWorker(
            cpu_threads=settings.cpu_threads,
            max_retired=settings.worker_max_retired,
            join_timeout_s=settings.worker_join_timeout_s,
            realtime_priority=settings.realtime_priority,
        )
        scheduling = self._worker.scheduling
        if not scheduling.applied and settings.realtime_required:
            raise WorkerSchedulingError(scheduling.realtime_priority, scheduling.reason)
        self._scheduling: Scheduling | None = None  # as last reported
        self._caller_realtime = False
        self._follow_scheduling()
        self._last_latency_ms: float | None = None
        self.last_decision: Decision | None = None
        self._last_packet: pb.SystemStatePacket | None = None  # what `anticipate` warms up on
        if blueprint_metadata is None:
            self.telemetry.emit(
                "blueprint_metadata_unavailable",
                "no catalogue lookup wired: the blueprint gate "
                + (
                    "holds every GERMINATE"
                    if settings.risk_require_blueprint_metadata
                    else "cannot vet blueprints"
                ),
            )
        self._warm_up()
        # P9: with a store, every decision is recorded and observed; the outbox publishes on `bus`.
        if store is not None:
            self._field_reports = FieldReports(
                settings,
                store,
                bus,
                clock,
                self.telemetry,
                policy_version=policy.version,
                hold=self._hold_until_checkpoint,
            )

    @property
    def step_timeout_ms(self) -> float:
        """The step budget (P1): the worker's deadline, the latency gate's base and health's threshold."""
        return self._step_timeout_ms

    @step_timeout_ms.setter
    def step_timeout_ms(self, value: float) -> None:
        _check_budget(value)
        self._step_timeout_ms = value
        self._risk.step_budget_ms = value
        self.telemetry.step_budget_ms = value

    def _warm_up(self) -> None:
        policy = self._policy
        status = self._worker.run(
            lambda _token: policy.warm_up(),
            timeout_ms=self.settings.warmup_timeout_ms,
            what="warm-up",
            realtime=False,
        )
        if status is not None:
            self.telemetry.record_compile(status.enabled, status.reason, status.warm_ms, status.fallbacks)
        self._follow_scheduling()

    def _follow_scheduling(self) -> None:
        """Report the inference thread's scheduling at start and whenever it changes (a thread that could
        not get its real-time priority back after a warm-up, a replacement thread refused it)."""
        current = self._worker.scheduling
        if current == self._scheduling or (current.pending and self._scheduling is not None):
            return  # a replacement thread that has not started yet says nothing new
        self._scheduling = current
        self._caller_realtime = current.applied and current.realtime_priority > 0
        self.telemetry.record_scheduling(current.realtime_priority, current.applied, current.reason)

    @property
    def policy_version(self) -> str:
        """Version of the policy currently deciding."""
        return self._policy.version

    def swap_policy(self, policy: Policy) -> Policy:
        """Make `policy` decide from the next packet on, in one step; returns the one it replaces (P3).

        Call it between decisions (the policy-update intake does), never from inside one.
        """
        previous = self._policy
        self._policy, self._graph_policy = policy, policy if isinstance(policy, GraphPolicy) else None
        return previous

    def prepare(self, packet: pb.SystemStatePacket) -> None:
        """Warm up on `packet`'s topology outside the decision deadline (under the warm-up budget): a graph
        policy builds the graph (normaliser statistics untouched) and runs its network on the inference
        worker without deciding. Nothing is recorded, signed or counted as a decision; a plain policy has
        nothing to warm up. Tolaria calls it before a process's first decision and after a topology
        change; failures raise typed errors like a decision's.

        Then it measures the policy on this machine: `PROBE_RUNS` graph builds and forwards as a decision
        runs them (on the inference worker, at a decision's priority, timed on the service's clock), kept
        in `policy_fit`. When they take more than `prepare_budget_share` of the step budget, a
        `policy_over_budget` event says so, with the figure and what to do, before any decision misses its
        deadline."""
        validate_packet(packet)
        graph_policy = self._graph_policy
        if graph_policy is None:
            return
        clock = self._clock

        def job(token: CancelToken) -> None:
            graph = graph_policy.builder.build(packet, update_stats=False)
            token.check()
            graph_policy.rehearse(graph)

        def probe(token: CancelToken) -> float:
            start = clock.monotonic()
            graph_policy.warm(graph_policy.builder.build(packet, update_stats=False), cancel=token)
            return (clock.monotonic() - start) * 1e3

        before = graph_policy.plan_status
        self._worker.run(
            job,
            timeout_ms=self.settings.warmup_timeout_ms,
            what=f"warm-up on {packet.packet_id}",
            realtime=False,  # tracing a plan takes hundreds of milliseconds: not at real-time priority
        )
        # One job per run, at the priority a decision runs at (at normal priority a busy machine's other
        # processes would be measured too).
        what = f"measurement on {packet.packet_id}"
        timeout_ms = self.settings.warmup_timeout_ms
        samples = [self._worker.run(probe, timeout_ms=timeout_ms, what=what) for _ in range(PROBE_RUNS)]
        after = graph_policy.plan_status
        if dataclasses.replace(after, capture=before.capture) != before:
            failed = after.fallbacks > before.fallbacks
            self.telemetry.record_plan(after.enabled, after.reason, after.build_ms, failed=failed)
        if after.capture != before.capture:
            capture = after.capture
            failed = capture.fallbacks > before.capture.fallbacks
            self.telemetry.record_cuda_graph(
                capture.enabled, capture.reason, capture.capture_ms, failed=failed
            )
        fit = PolicyFit(
            measured_ms=sorted(samples)[-2],
            allowed_ms=self.step_timeout_ms * self.settings.prepare_budget_share,
            budget_ms=self.step_timeout_ms,
            runs=len(samples),
            policy_size=graph_policy.size,
        )
        self.policy_fit = fit
        self.telemetry.metric("tamiyo.prepare.decision_ms", fit.measured_ms, "ms")
        if not fit.fits:
            self.telemetry.emit(
                "policy_over_budget",
                fit.message,
                measured_ms=f"{fit.measured_ms:.3f}",
                allowed_ms=f"{fit.allowed_ms:.3f}",
                budget_ms=f"{fit.budget_ms:g}",
                policy_size=fit.policy_size,
            )
        self._last_packet = packet
        self._follow_scheduling()

    def anticipate(self) -> None:
        """A decision is due shortly: warm up for it in the background and return at once.

        A graph policy builds the graph of the last packet it saw (prepared or decided; normaliser
        statistics untouched) and runs its network on the inference thread (at its priority), deciding
        and recording nothing. Measured in `esper run --policy gnn`: a decision that follows within a few
        milliseconds finds that core's caches warm and takes ~0.5 ms less (docs/p7-attention-and-cuda-
        graphs.md, Decision 7). A decision that arrives first cuts it short at its next checkpoint. Does
        nothing for a plain policy, before the first packet, or while the worker is busy; what became of
        each warm-up is counted (`tamiyo_warmups_ahead`), and one that fails is reported by an
        `anticipation_failed` event (its error would fail the decision too, which reports it again).
        """
        graph_policy, packet = self._graph_policy, self._last_packet
        if graph_policy is None or packet is None:
            return
        self._account_ahead()
        if self._ahead is not None:  # the last one is still running
            self.telemetry.warmups_ahead.labels(outcome="skipped").inc()
            return

        def job(token: CancelToken) -> None:
            graph = graph_policy.builder.build(packet, update_stats=False)
            token.check()
            graph_policy.warm(graph, cancel=token)

        self._ahead = self._worker.start(job, what=f"warm-up ahead of the decision after {packet.packet_id}")
        if self._ahead is None:
            self.telemetry.warmups_ahead.labels(outcome="skipped").inc()

    def _account_ahead(self) -> None:
        ahead = self._ahead
        if ahead is None or not ahead.finished:
            return
        self._ahead = None
        error = ahead.error
        if error is not None:
            self.telemetry.warmups_ahead.labels(outcome="failed").inc()
            self.telemetry.emit("anticipation_failed", f"{ahead.what}: {type(error).__name__}: {error}")
        else:
            self.telemetry.warmups_ahead.labels(outcome="cut_short" if ahead.cut_short else "completed").inc()

    def evaluate_step(self, packet: pb.SystemStatePacket) -> pb.AdaptationCommand:
        """Decide for one packet and return the signed command; failures raise typed errors."""
        if self._in_flight is not None:
            raise DecisionInFlight(self._in_flight.packet.packet_id)
        swapped = self._between_decisions()
        with self._judged():
            if swapped:
                self.prepare(packet)
            with _collections_deferred():
                return self._decide(packet)

    def consult(self, updates: PolicyUpdates) -> None:
        """Take policy updates from `updates` between decisions, whatever the policy: before each decision
        it polls them (outside the decision's budget) and warms a policy it swapped in up on the packet;
        after each decision it reports the outcome, which a fresh policy's probation counts."""
        self._updates = updates

    def _between_decisions(self) -> bool:
        """Poll the update input: True when it swapped another policy in (the caller warms it up on its
        packet, outside the budget; a failed warm-up counts against it)."""
        return self._updates is not None and self._updates.between_decisions()

    @contextmanager
    def _judged(self, *, success_ends: bool = True) -> Iterator[None]:
        """Report the decision's outcome to the update input: a failure that is the policy's (not the
        packet's) always, a success when the decision ends here (`success_ends`)."""
        updates = self._updates
        if updates is None:
            yield
            return
        try:
            yield
        except (ContractViolation, MalformedMessage):
            raise  # the packet's fault, not the policy's
        except Exception as exc:
            updates.judge(f"{type(exc).__name__}: {exc}")
            raise
        if success_ends:
            updates.judge("")

    def submit(self, packet: pb.SystemStatePacket) -> None:
        """Start the decision for `packet` on the inference worker and return at once; `collect` it later.

        The step budget counts from here: the worker's job stops at its first checkpoint after it, whether
        or not anybody waits. One decision at a time (`DecisionInFlight` otherwise). An invalid packet, a
        closed or saturated worker raise here, and nothing is in flight then."""
        if self._in_flight is not None:
            raise DecisionInFlight(self._in_flight.packet.packet_id)
        swapped = self._between_decisions()
        with self._judged(success_ends=False):
            if swapped:
                self.prepare(packet)
            validate_packet(packet)
            self._account_ahead()
            try:
                pending = self._worker.submit(
                    self._inference_job(packet),
                    timeout_ms=self.step_timeout_ms,
                    what=f"decision for {packet.packet_id}",
                )
            except WorkerSaturated as exc:
                self.telemetry.emit("worker_saturated", str(exc), packet_id=packet.packet_id)
                raise
        self._in_flight = _InFlight(packet, pending)

    @property
    def in_flight(self) -> bool:
        """A decision was submitted and not collected yet."""
        return self._in_flight is not None

    def collect(self) -> pb.AdaptationCommand:
        """The signed command of the decision `submit` started, waiting at most for what is left of its
        budget. A decision not back by its deadline raises `DeadlineExceeded` (a CRITICAL event, counted;
        its job stops at its next checkpoint, its result is discarded); other failures raise their typed
        errors, as `evaluate_step`'s do."""
        in_flight = self._in_flight
        if in_flight is None:
            raise EsperError("no decision in flight: submit a packet first")
        self._in_flight = None
        with self._judged():
            return self._collected(in_flight)

    def _collected(self, in_flight: _InFlight) -> pb.AdaptationCommand:
        packet, pending = in_flight.packet, in_flight.pending
        try:
            # A pipelined decision usually finds its job done: the caller is raised only when it must
            # still wait for the inference thread (raising and restoring cost more than the rest).
            waits = not pending.finished
            with _collections_deferred(), self._caller_priority(raised=waits):
                inference = self._inference_outcome(packet, pending.collect, lambda: pending.elapsed_ms)
                inference_ms = pending.elapsed_ms  # from the submission to the job's end
                collected = self._clock.monotonic()  # the rest is measured from here, not from the wait

                def spent_ms() -> float:
                    return inference_ms + (self._clock.monotonic() - collected) * 1e3

                decision, command, latency_ms = self._conclude(packet, inference, spent_ms)
            self._after(packet, inference, decision, command, latency_ms)
            return command
        finally:
            self._bookkeeping(packet)

    def _decide(self, packet: pb.SystemStatePacket) -> pb.AdaptationCommand:
        start = self._clock.monotonic()

        def spent_ms() -> float:
            return (self._clock.monotonic() - start) * 1e3

        try:
            with self._caller_priority():  # from the packet to the signed command: the measured part
                validate_packet(packet)
                inference = self._infer(packet, start)
                decision, command, latency_ms = self._conclude(packet, inference, spent_ms)
            self._after(packet, inference, decision, command, latency_ms)
            return command
        finally:
            self._bookkeeping(packet)

    def _conclude(
        self, packet: pb.SystemStatePacket, inference: _Inference, spent_ms: Callable[[], float]
    ) -> tuple[RiskDecision, pb.AdaptationCommand, float]:
        """Risk gates and signing: the measured part after inference; `spent_ms` says what the decision
        has taken so far."""
        # The gates' catalogue lookup answers within what is left of the budget.
        context = RiskContext(
            last_latency_ms=self._last_latency_ms, remaining_ms=self.step_timeout_ms - spent_ms()
        )
        decision = self._risk.evaluate(inference.proposal, packet, context)
        annotations = {**decision.annotations(), **self._blend.annotations(decision.proposal)}
        try:
            command = self._commands.build(decision.proposal, packet, annotations)
        except CommandBuildError as exc:
            self._report(packet, inference, decision)
            self.telemetry.emit("command_build_failed", str(exc), packet_id=packet.packet_id)
            raise
        return decision, command, spent_ms()

    def _after(
        self,
        packet: pb.SystemStatePacket,
        inference: _Inference,
        decision: RiskDecision,
        command: pb.AdaptationCommand,
        latency_ms: float,
    ) -> None:
        """Outside the measured part: reports, telemetry, normaliser statistics and the durable record."""
        self._last_latency_ms = latency_ms
        self._report(packet, inference, decision)
        self.telemetry.record_decision(decision.proposal, latency_ms)
        if latency_ms > self.step_timeout_ms:
            self.telemetry.emit(
                "step_over_budget",
                f"step took {latency_ms:.2f} ms after inference",
                packet_id=packet.packet_id,
            )
        self.last_decision = Decision(inference.proposal, decision, command, latency_ms, self._policy.version)
        self._flush_normalizer()
        self._last_packet = packet
        self._record(packet, inference.proposal, decision, command)

    def _bookkeeping(self, packet: pb.SystemStatePacket) -> None:
        self._account_ahead()
        self._follow_scheduling()
        if self._field_reports is not None:
            self._field_reports.emit_pending()
        if self.telemetry.has_sink:
            self.telemetry.flush(packet.training_run_id)

    def _report(self, packet: pb.SystemStatePacket, inference: _Inference, decision: RiskDecision) -> None:
        # After the command is built, outside the measured part: nothing here changes the command, and the
        # events (a run's first decision reports its missing features, with a log line) cost 0.02-0.2 ms.
        if inference.coverage is not None:
            self.telemetry.record_coverage(inference.coverage, packet.packet_id)
        if decision.overridden:
            self.telemetry.overrides.labels(gate=decision.gate).inc()
            self.telemetry.emit(
                "risk_gate_override", decision.reason, gate=decision.gate, packet_id=packet.packet_id
            )

    @contextmanager
    def _caller_priority(self, *, raised: bool = True) -> Iterator[None]:
        """The calling thread one above the inference thread's real-time priority for the measured part
        of a decision, where the inference thread has it: the hand-offs, the risk gates and the signing run
        on it, and at normal priority it can wait behind other tasks as the inference thread did. A
        refusal is announced once and not retried."""
        restore = None
        if raised and self._caller_realtime:
            priority = self.settings.realtime_priority  # the inference thread's (it has it)
            try:
                # One above the inference thread: on a single core, a caller at the same FIFO priority
                # could not preempt a late job when its deadline passes.
                restore = raise_priority(priority + 1)
            except (OSError, AttributeError) as exc:
                self._caller_realtime = False
                reason = f"calling thread: {type(exc).__name__}: {exc}"
                self.telemetry.record_scheduling(priority, False, reason)
        try:
            yield
        finally:
            if restore is not None:
                restore()

    def _inference_job(self, packet: pb.SystemStatePacket) -> Callable[[CancelToken], _Inference]:
        graph_policy = self._graph_policy
        if graph_policy is not None:

            def graph_job(token: CancelToken) -> _Inference:
                graph = graph_policy.builder.build(packet)
                token.check()
                return _Inference(graph_policy.propose_graph(graph, cancel=token), graph.coverage)

            return graph_job
        plain = self._policy

        def plain_job(token: CancelToken) -> _Inference:
            return _Inference(plain.propose(packet), None)

        return plain_job

    def _infer(self, packet: pb.SystemStatePacket, start: float) -> _Inference:
        job = self._inference_job(packet)
        remaining_ms = self.step_timeout_ms - (self._clock.monotonic() - start) * 1e3
        return self._inference_outcome(
            packet,
            lambda: self._worker.run(job, timeout_ms=remaining_ms),
            lambda: (self._clock.monotonic() - start) * 1e3,
        )

    def _inference_outcome(
        self,
        packet: pb.SystemStatePacket,
        outcome: Callable[[], _Inference],
        elapsed_ms: Callable[[], float],
    ) -> _Inference:
        """`outcome()` (the worker's answer), with each failure reported: a missed deadline is a CRITICAL
        event and a counted miss, raised as `DeadlineExceeded`; the others are raised as they are."""
        try:
            return outcome()
        except DeadlineExceeded as exc:
            elapsed = elapsed_ms()
            self._last_latency_ms = elapsed
            self.telemetry.record_deadline_miss(self.step_timeout_ms, elapsed, packet.packet_id)
            raise DeadlineExceeded(self.step_timeout_ms, elapsed, f"decision for {packet.packet_id}") from exc
        except WorkerSaturated as exc:
            self.telemetry.emit("worker_saturated", str(exc), packet_id=packet.packet_id)
            raise
        except PolicyInferenceError as exc:
            self.telemetry.emit("policy_inference_failed", str(exc), packet_id=packet.packet_id)
            graph_policy = self._graph_policy
            if exc.compile_disabled and graph_policy is not None:
                status = graph_policy.compile_status
                self.telemetry.record_compile(status.enabled, status.reason, status.warm_ms, status.fallbacks)
            raise
        except EsperError as exc:
            self.telemetry.emit(
                "policy_inference_failed", f"{type(exc).__name__}: {exc}", packet_id=packet.packet_id
            )
            raise

    def _flush_normalizer(self) -> None:
        # Outside the deadline: the command is already built. A failed write is an ERROR event.
        if self._graph_policy is None:
            return
        self._graph_policy.builder.normalizer.commit()  # this packet's values join the statistics
        if not self._graph_policy.builder.normalizer.flush_due:
            return
        try:
            self._graph_policy.builder.normalizer.flush()
        except NormalizerWriteError as exc:
            self.telemetry.emit("normalizer_flush_failed", str(exc), reason=exc.reason)

    def _record(
        self,
        packet: pb.SystemStatePacket,
        proposal: Proposal,
        decision: RiskDecision,
        command: pb.AdaptationCommand,
    ) -> None:
        # Outside the deadline: the command is built. A store failure raises (the decision is unrecorded).
        if self._field_reports is not None:
            self._field_reports.after_decision(
                packet,
                command,
                proposal=proposal,
                final=decision.proposal,
                risk_reason=decision.reason,
                policy_version=self._policy.version,
            )

    def export_state(self) -> dict[str, Any]:
        """JSON-ready state to resume exactly (saved with every checkpoint): the update input's, which
        holds the serving policy's, or the policy's own when no updates are consulted."""
        if self._updates is not None:
            return self._updates.export_state()
        return self._policy.state()

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Inverse of `export_state`."""
        if self._updates is not None:
            self._updates.restore_state(state)
        else:
            self._policy.restore(dict(state))

    def checkpointed(self, training_run_id: str, step: int) -> None:
        """The run's checkpoint of `step` is durable: its records up to that step may be published.

        Called on the checkpoint writer's thread, at any time; touches only the store (thread-safe) and
        wakes the outbox. Nothing to do without a store."""
        if self._field_reports is not None:
            self._field_reports.release_through(training_run_id, step)

    def rewound(self, training_run_id: str, step: int) -> None:
        """The run rolled back to its checkpoint of `step` (on the trainer's thread): the decisions and
        reports recorded after it are abandoned, as on a resume. Nothing to do without a store."""
        if self._field_reports is not None:
            self._field_reports.rewind(training_run_id, step)

    def close(self, *, abort_open_windows: bool = True) -> None:
        """Stop the inference worker (joining its threads), write the normaliser statistics, close the field
        reports, and stop the telemetry publisher (what it cannot deliver in time is counted and logged).

        With a store: open observation windows close as ABORTED (`abort_open_windows=False` leaves them for
        a resumed run), and the outbox publishes what is due one last time (the store stays open).
        Every part is closed even when an earlier one fails; the first failure is raised (`WorkerLeak` if a
        worker thread does not stop, `NormalizerWriteError` if the final write fails, `StoreError` if the
        store does) and the others are logged beside it.
        """
        self._close_parts(abort_open_windows=abort_open_windows, cause=None)

    def _close_parts(self, *, abort_open_windows: bool, cause: BaseException | None) -> None:
        """Close every part that exists, each even when another failed. With `cause` (a failed
        construction) every failure here is logged beside it; otherwise the first is raised after all
        parts were tried, and the rest are logged beside it."""
        worker: InferenceWorker | None = getattr(self, "_worker", None)  # absent if its start failed
        steps: list[tuple[str, Callable[[], object]]] = []
        if worker is not None:
            steps.append(("inference worker", worker.close))
            steps.append(("warm-up ahead", self._account_ahead))
        if self._graph_policy is not None and worker is not None and cause is None:
            steps.append(("normaliser statistics", self._graph_policy.builder.normalizer.flush))
        field_reports = self._field_reports
        if field_reports is not None:
            steps.append(
                ("field reports", lambda: field_reports.close(abort_open_windows=abort_open_windows))
            )
            if self.telemetry.has_sink:
                steps.append(("last telemetry packet", self.telemetry.flush))
        steps.append(("telemetry publisher", self.telemetry.close))
        first = cause
        for what, step in steps:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 (every part is tried; the first is raised, the rest logged)
                if first is None:
                    first = exc
                    continue
                _log.error(
                    "closing Tamiyo's %s failed beside %s: %s: %s",
                    what,
                    type(first).__name__,
                    type(exc).__name__,
                    exc,
                    exc_info=exc,
                )
                first.add_note(f"also failed while closing Tamiyo's {what}: {type(exc).__name__}: {exc}")
        if cause is None and first is not None:
            raise first


def _check_budget(budget_ms: float) -> None:
    if not (math.isfinite(budget_ms) and budget_ms > 0):
        raise ValueError(f"step_timeout_ms must be finite and > 0, got {budget_ms}")
