"""Field-report lifecycle (P9): one observation window per decision, one report when it closes.

Every decision opens a window keyed by its command id, at the packet's epoch, with the packet's validation
accuracy, loss and parameter count as baseline; the decision record (packet, behaviour log-probability,
value, head choices) is stored in the same transaction. Later packets reach Tamiyo through
`evaluate_step`; a packet at epoch >= start + N (`TAMIYO_FR_OBS_WINDOW_EPOCHS`) closes the window with a
report `fr-synth-<uuid>`: the outcome judged from the accuracy and loss change over the window, the
parameter cost, the seed's counterfactual contribution when Kasmina measured it, and
`observation_window_epochs = N`. A WIDEN or DEEPEN is reported the same way: its blueprint is the
operation's name, and its seed is the growth it started (`fc1:w1`) while the packets still carry that
growth, else its layer (a widen merged into the host is judged by the accuracy and parameter change).

A FOSSILIZE or CULL ends a seed's or growth's life: its report also carries, as
`end_contribution_accuracy`, the counterfactual accuracy contribution Kasmina had measured for that seed
or growth when the decision was made (read from the stored decision's packet). That is the figure the
keep or cull was judged on, and the only one left once a fossil is stacked or a widen merged into its
layer (neither shows in later packets); Simic credits it to the germination, WIDEN or DEEPEN that
started the seed or growth.
Windows live in the store, so a restarted service resumes them; at the end
of a run the windows still open close as ABORTED, with the epochs really observed (0 if none).

Every record is written as of a training step: a decision as of its packet's global step, a report as
of the packet that closed its window (an ABORTED one as of the last packet seen). With `hold`, the outbox
publishes a run's records only once a durable checkpoint covers that step (`release_through`, which the
trainer's checkpoint writer calls); a completed run releases everything when it closes.

`FieldReports` bundles the lifecycle with the outbox and its publisher thread for the service.
"""

from __future__ import annotations

import math
import queue
import uuid

from esper.leyline import Clock, pb, short_name
from esper.oona import Bus
from esper.tamiyo.model.normalizer_state import statistics_to_proto
from esper.tamiyo.model.proposal import Proposal
from esper.tamiyo.records.errors import StoreError
from esper.tamiyo.records.outbox import FieldReportOutbox, OutboxMetrics, OutboxPublisher
from esper.tamiyo.records.schema import ObservationWindow
from esper.tamiyo.records.store import TamiyoStore
from esper.tamiyo.runtime.telemetry import TamiyoTelemetry
from esper.tamiyo.settings import TamiyoSettings

SYNTH_PREFIX = "fr-synth-"
_OUTCOME_NAMES = {
    pb.FIELD_REPORT_OUTCOME_SUCCESS: "SUCCESS",
    pb.FIELD_REPORT_OUTCOME_NEUTRAL: "NEUTRAL",
    pb.FIELD_REPORT_OUTCOME_REGRESSION: "REGRESSION",
    pb.FIELD_REPORT_OUTCOME_ABORTED: "ABORTED",
}


def new_report_id() -> str:
    """A report id that is unique for ever (random, never a counter that a restart could reset)."""
    return f"{SYNTH_PREFIX}{uuid.uuid4().hex}"


def judge_outcome(accuracy_delta: float, loss_delta_frac: float | None, settings: TamiyoSettings) -> int:
    """REGRESSION if accuracy fell or loss rose past the thresholds, SUCCESS on a clear gain, else NEUTRAL."""
    if accuracy_delta <= -settings.fr_regression_accuracy_drop or (
        loss_delta_frac is not None and loss_delta_frac >= settings.fr_regression_loss_rise
    ):
        return int(pb.FIELD_REPORT_OUTCOME_REGRESSION)
    if accuracy_delta >= settings.fr_success_accuracy_gain:
        return int(pb.FIELD_REPORT_OUTCOME_SUCCESS)
    return int(pb.FIELD_REPORT_OUTCOME_NEUTRAL)


def _param_count(packet: pb.SystemStatePacket) -> float | None:
    value = packet.training_metrics.get("param_count")
    return None if value is None else float(value)


def _seed_state(packet: pb.SystemStatePacket, slot_id: str) -> pb.SeedState | None:
    if not slot_id:
        return None
    return next((state for state in packet.seed_states if state.slot_id == slot_id), None)


# Decisions that end a seed's or a growth's life (their reports carry `end_contribution_accuracy`).
_LIFE_ENDS = frozenset({pb.POLICY_ACTION_FOSSILIZE, pb.POLICY_ACTION_CULL})

# A growth command's window names the operation as its blueprint (what its growth's `SeedState` carries).
_GROWTH_NAMES = {pb.SEED_OP_WIDEN: "widen", pb.SEED_OP_DEEPEN: "deepen"}


def _growth_state(packet: pb.SystemStatePacket, window: ObservationWindow) -> pb.SeedState | None:
    """The newest growth of the window's operation on its layer (`<layer>:w<n>` or `<layer>:d<n>`)
    that the packet still reports; None once it merged into the host or was culled and reset."""
    prefix = f"{window.seed_id}:"
    states = [
        state
        for state in packet.growth_states
        if state.blueprint_id == window.blueprint_id and state.seed_id.startswith(prefix)
    ]
    return max(states, key=lambda state: int(state.seed_id.rsplit(":", 1)[1][1:] or 0), default=None)


class FieldReportLifecycle:
    """Opens a window per decision, closes due windows into reports, aborts what is open at the end."""

    def __init__(self, settings: TamiyoSettings, store: TamiyoStore, clock: Clock) -> None:
        self._settings = settings
        self._store = store
        self._clock = clock
        self._last_epoch: dict[str, int] = {}  # per run: the latest epoch a packet showed this lifecycle
        self._last_step: dict[str, int] = {}  # per run: the latest global step a packet showed it

    def rewind(self, training_run_id: str, step: int) -> None:
        """Forget the steps of `training_run_id` after `step` (a rollback took the run back there)."""
        if self._last_step.get(training_run_id, step) > step:
            self._last_step[training_run_id] = step
            self._last_epoch.pop(training_run_id, None)

    # -- decisions ----------------------------------------------------------------------------------

    def record_decision(
        self,
        packet: pb.SystemStatePacket,
        command: pb.AdaptationCommand,
        *,
        proposal: Proposal,
        final: Proposal,
        risk_reason: str,
        policy_version: str,
    ) -> ObservationWindow:
        """Store the decision record and open its window (one transaction); returns the window.

        `proposal` is what the policy chose (its log-probability is the behaviour policy's), `final` what
        the risk gates made of it and `command` what was issued.
        """
        record = pb.DecisionRecord(
            decision_id=f"dec-{command.command_id.removeprefix('cmd-')}",
            command_id=command.command_id,
            training_run_id=packet.training_run_id,
            action=proposal.action,
            log_prob=proposal.log_prob,
            value_estimate=proposal.value,
            policy_version=policy_version,
            final_command_type=command.command_type,
            risk_reason=risk_reason,
            slot_id=proposal.slot_id,
            blueprint_id=proposal.blueprint_id,
        )
        record.packet.CopyFrom(packet)
        record.issued_at.CopyFrom(command.issued_at)
        record.head_choices.update(proposal.head_choices)
        record.head_log_probs.update(proposal.head_log_probs)
        record.normalizer.extend(statistics_to_proto(proposal.normalized_with))
        if proposal.layer_id:  # a growth proposal: its layer and amount, for the learner
            record.growth.layer_id = proposal.layer_id
            record.growth.units = proposal.units
            record.growth.init = proposal.growth_init  # type: ignore[assignment]
            record.growth.hidden = proposal.hidden
        seed_op = command.seed_operation if command.HasField("seed_operation") else None
        window = ObservationWindow(
            command_id=command.command_id,
            training_run_id=packet.training_run_id,
            start_epoch=packet.current_epoch,
            window_epochs=self._settings.fr_obs_window_epochs,
            opened_at_ns=self._clock.wall_ns(),
            policy_version=policy_version,
            action=final.action,
            command_type=command.command_type,
            slot_id=seed_op.slot_id if seed_op else "",
            seed_id=command.target_seed_id,
            blueprint_id=(_GROWTH_NAMES.get(seed_op.operation, seed_op.blueprint_id) if seed_op else ""),
            baseline_accuracy=packet.validation_accuracy,
            baseline_loss=packet.validation_loss,
            baseline_params=_param_count(packet),
        )
        self._store.record_decision(record, window)
        return window

    # -- closing windows ----------------------------------------------------------------------------

    def observe(self, packet: pb.SystemStatePacket) -> list[pb.FieldReport]:
        """Close every window of the packet's run that its epoch completes; returns the reports written."""
        run = packet.training_run_id
        self._last_epoch[run] = max(self._last_epoch.get(run, packet.current_epoch), packet.current_epoch)
        self._last_step[run] = max(self._last_step.get(run, packet.global_step), packet.global_step)
        reports = []
        for window in self._store.due_windows(packet.training_run_id, packet.current_epoch):
            report = self.synthesise(window, packet)
            self._store.close_window(window.command_id, report, as_of_step=packet.global_step)
            reports.append(report)
        return reports

    def synthesise(self, window: ObservationWindow, packet: pb.SystemStatePacket) -> pb.FieldReport:
        """The report of `window` as measured by `packet`."""
        metrics: dict[str, float] = {
            "baseline_accuracy": window.baseline_accuracy,
            "final_accuracy": packet.validation_accuracy,
            "accuracy_delta": packet.validation_accuracy - window.baseline_accuracy,
            "baseline_loss": window.baseline_loss,
            "final_loss": packet.validation_loss,
            "loss_delta": packet.validation_loss - window.baseline_loss,
            "epochs_observed": float(packet.current_epoch - window.start_epoch),
        }
        loss_frac = None
        if window.baseline_loss > 0:
            loss_frac = metrics["loss_delta"] / window.baseline_loss
            metrics["loss_delta_frac"] = loss_frac
        params = _param_count(packet)
        if params is not None and window.baseline_params is not None:
            metrics["param_delta"] = params - window.baseline_params
            if window.baseline_params > 0:
                metrics["param_growth_frac"] = metrics["param_delta"] / window.baseline_params
        seed_id = window.seed_id
        growth = window.action in (pb.POLICY_ACTION_WIDEN, pb.POLICY_ACTION_DEEPEN)
        state = _growth_state(packet, window) if growth else _seed_state(packet, window.slot_id)
        if growth and state is not None:
            seed_id = state.seed_id  # the growth this command started
            metrics["growth_stage"] = float(state.stage)
        if state is not None:
            if state.metrics.get("contribution_measured") == 1.0:
                for key in ("contribution_accuracy", "contribution_loss"):
                    if key in state.metrics:
                        metrics[key] = float(state.metrics[key])
            if window.action == pb.POLICY_ACTION_GERMINATE and state.blueprint_id:
                seed_id = state.seed_id  # the seed this germination created
        metrics.update(self._end_contribution(window))
        outcome = judge_outcome(metrics["accuracy_delta"], loss_frac, self._settings)
        return self._report(window, outcome, metrics, seed_id, notes="")

    def _end_contribution(self, window: ObservationWindow) -> dict[str, float]:
        """For a FOSSILIZE or CULL: `end_contribution_accuracy`, the contribution of the seed or growth it
        ended as measured in its decision's packet; empty when none was measured (unmeasured, not 0)."""
        if window.action not in _LIFE_ENDS or not window.slot_id:
            return {}
        decided = self._store.decision(window.command_id)
        if decided is None:
            return {}
        packet = decided.packet
        states = [*packet.seed_states, *packet.growth_states]
        state = next((s for s in states if s.slot_id == window.slot_id), None)
        if state is None or state.metrics.get("contribution_measured") != 1.0:
            return {}
        value = state.metrics.get("contribution_accuracy")
        if value is None or not math.isfinite(value):
            return {}
        return {"end_contribution_accuracy": float(value)}

    def abort_open(self, reason: str, training_run_id: str | None = None) -> list[pb.FieldReport]:
        """Close every open window (of one run, or all) as ABORTED with `reason`.

        The report's window is what was observed: the epochs from the decision to the latest packet this
        lifecycle saw of the run (0 when none came after it), never the `N` the window was opened for.
        """
        reports = []
        for window in self._store.open_windows(training_run_id):
            last = self._last_epoch.get(window.training_run_id, window.start_epoch)
            observed = max(0, last - window.start_epoch)
            metrics = {
                "baseline_accuracy": window.baseline_accuracy,
                "baseline_loss": window.baseline_loss,
                "epochs_observed": float(observed),
                **self._end_contribution(window),  # measured at the decision: the run's end cannot undo it
            }
            report = self._report(
                window,
                pb.FIELD_REPORT_OUTCOME_ABORTED,
                metrics,
                window.seed_id,
                reason,
                observed_epochs=observed,
            )
            self._store.close_window(window.command_id, report, as_of_step=self._as_of(window))
            reports.append(report)
        return reports

    def _as_of(self, window: ObservationWindow) -> int | None:
        """The step an ABORTED report is written as of: the latest packet seen of its run, else (none seen
        by this process) its decision's; None when even that is unreadable (never held, then)."""
        step = self._last_step.get(window.training_run_id)
        if step is not None:
            return step
        decided = self._store.decision(window.command_id)
        return None if decided is None else decided.packet.global_step

    def _report(
        self,
        window: ObservationWindow,
        outcome: int,
        metrics: dict[str, float],
        seed_id: str,
        notes: str,
        *,
        observed_epochs: int | None = None,
    ) -> pb.FieldReport:
        report = pb.FieldReport(
            report_id=new_report_id(),
            command_id=window.command_id,
            training_run_id=window.training_run_id,
            seed_id=seed_id,
            blueprint_id=window.blueprint_id,
            outcome=outcome,
            observation_window_epochs=window.window_epochs if observed_epochs is None else observed_epochs,
            tamiyo_policy_version=window.policy_version,
            action=window.action,
            notes=notes,
        )
        report.metrics.update(metrics)
        report.issued_at.FromNanoseconds(self._clock.wall_ns())
        return report


class FieldReports:
    """What the service holds: the lifecycle, the outbox and its publisher thread, and their telemetry.

    Events raised on the publisher thread are queued and emitted on the service's thread by
    `emit_pending`, so the telemetry buffer is only ever touched by one thread.
    """

    def __init__(
        self,
        settings: TamiyoSettings,
        store: TamiyoStore,
        bus: Bus | None,
        clock: Clock,
        telemetry: TamiyoTelemetry,
        *,
        policy_version: str,
        background: bool = True,
        hold: bool = False,
    ) -> None:
        self.store = store
        self.hold = hold
        self.lifecycle = FieldReportLifecycle(settings, store, clock)
        self._telemetry = telemetry
        self._queued: queue.SimpleQueue[tuple[str, str, dict[str, str]]] = queue.SimpleQueue()
        self.metrics = OutboxMetrics(telemetry.registry)
        retention = store.apply_retention(settings.retention_days)
        store.record_policy_version(policy_version, "service start")
        self.outbox: FieldReportOutbox | None = None
        self._publisher: OutboxPublisher | None = None
        if bus is None:
            pending = store.pending_count("field_report")
            self.metrics.pending.set(pending)
            telemetry.emit(
                "field_report_outbox_unwired",
                f"no bus wired: field reports are stored in {store.path} and wait there ({pending} pending)",
                path=str(store.path),
            )
        else:
            self.outbox = FieldReportOutbox(
                store, bus, settings, clock, metrics=self.metrics, events=self._queue_event, hold=hold
            )
            if background:
                self._publisher = OutboxPublisher(
                    self.outbox,
                    self._queue_event,
                    poll_s=settings.fr_outbox_poll_ms / 1000,
                )
        if retention.field_reports or retention.decisions:
            telemetry.emit(
                "tamiyo_store_retention",
                f"retention removed {retention.field_reports} reports and {retention.decisions} decisions "
                f"older than {settings.retention_days:g} days",
                removed_reports=str(retention.field_reports),
            )

    def _queue_event(self, name: str, description: str, /, **attributes: str) -> None:
        self._queued.put((name, description, attributes))

    def after_decision(
        self,
        packet: pb.SystemStatePacket,
        command: pb.AdaptationCommand,
        *,
        proposal: Proposal,
        final: Proposal,
        risk_reason: str,
        policy_version: str,
    ) -> list[pb.FieldReport]:
        """Close the windows this packet completes, record the decision, wake the publisher.

        A store failure is a `StoreError` (with an ERROR event): the decision was not recorded.
        """
        try:
            reports = self.lifecycle.observe(packet)
            self.lifecycle.record_decision(
                packet,
                command,
                proposal=proposal,
                final=final,
                risk_reason=risk_reason,
                policy_version=policy_version,
            )
        except StoreError as exc:
            self._telemetry.emit("tamiyo_store_write_failed", str(exc), path=str(exc.path))
            raise
        self._announce(reports)
        if self._publisher is not None:
            self._publisher.notify()
        return reports

    def release_through(self, training_run_id: str, step: int) -> None:
        """The run's checkpoint of `step` is durable: publish what it covers (any thread: the checkpoint
        writer calls it). A failed write is a queued `tamiyo_store_write_failed` event, not an error:
        the records wait, and the next checkpoint's release covers them too."""
        try:
            self.store.release_through(training_run_id, step)
        except StoreError as exc:
            self._queue_event(
                "tamiyo_store_write_failed",
                f"releasing run {training_run_id} through step {step} failed ({exc}); its records wait for "
                "the next checkpoint",
                path=str(exc.path),
                step=str(step),
            )
            return
        if self._publisher is not None:
            self._publisher.notify()

    def rewind(self, training_run_id: str, step: int) -> None:
        """The run went back to step `step`: abandon what was recorded after it (one store transaction;
        with holding, none of it was published), and forget the later steps this lifecycle saw."""
        self.store.abandon_after(training_run_id, step)
        self.lifecycle.rewind(training_run_id, step)

    def _announce(self, reports: list[pb.FieldReport]) -> None:
        for report in reports:
            outcome = _OUTCOME_NAMES.get(report.outcome, str(report.outcome))
            self._telemetry.emit(
                "field_report_synthesised",
                f"{report.report_id} for {report.command_id}: {outcome} over "
                f"{report.observation_window_epochs} epoch(s) "
                f"({short_name(pb.PolicyAction, report.action) if report.action else 'no action'})",
                report_id=report.report_id,
                command_id=report.command_id,
                outcome=outcome,
            )

    def emit_pending(self) -> None:
        """Emit the events the publisher thread queued, and the outbox figures, on this thread."""
        while True:
            try:
                name, description, attributes = self._queued.get_nowait()
            except queue.Empty:
                break
            self._telemetry.emit(name, description, **attributes)
        for name, value in self.metrics.values().items():
            self._telemetry.metric(name, value)

    def close(self, *, abort_open_windows: bool) -> None:
        """Stop the publisher; close open windows as ABORTED (end of run) or leave them to resume; publish
        what is due one last time. The store stays open (its owner closes it).

        When the run ended, a holding outbox releases everything first (`TamiyoStore.release_all`); a run
        that stopped early keeps what no checkpoint covers held, for its resume to abandon."""
        try:
            if self._publisher is not None:
                self._publisher.close()
            if abort_open_windows:
                try:
                    self._announce(self.lifecycle.abort_open("run ended before the window closed"))
                    if self.hold:
                        self.store.release_all()
                except StoreError as exc:
                    self._telemetry.emit("tamiyo_store_write_failed", str(exc), path=str(exc.path))
                    raise
            if self.outbox is not None:
                # Full batches published: more may be due. A failed pass leaves the rest pending on disk.
                draining = True
                while draining:
                    draining = self.outbox.pump().published >= self.outbox.batch
        finally:
            self.emit_pending()
