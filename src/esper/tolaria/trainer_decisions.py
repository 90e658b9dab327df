"""The decision pipeline of `Trainer`: packets submitted to the controller, commands collected and applied.

A decision is submitted every `decision_interval` steps and collected `decision_lag_steps` later; one
not back in time is a deadline miss, one that the host's or its slot's change made stale is dropped.
"""

from __future__ import annotations

from typing import Any

from esper.kasmina import stage_name
from esper.leyline import DecisionDeadlineMissed, EsperError, pb, value_label
from esper.tolaria.packet import build_packet, unmeasured_hardware
from esper.tolaria.trainer_core import _InFlight, _TrainerCore


class ControllerFailed(EsperError):
    """The controller failed `max_controller_failures` decisions in a row."""

    def __init__(self, step: int, failures: int, last_error: BaseException) -> None:
        self.step = step
        self.failures = failures
        self.last_error = last_error
        super().__init__(self._message())

    def _message(self) -> str:
        return f"controller failed {self.failures} decisions in a row (step {self.step}): {self.last_error}"


class DecisionsMissed(ControllerFailed):
    """The controller missed its deadline on `max_consecutive_misses` decisions in a row."""

    def _message(self) -> str:
        return (
            f"controller missed its deadline on {self.failures} decisions in a row (step {self.step}): "
            f"{self.last_error}"
        )


class _DecisionPipeline(_TrainerCore):
    """Submits decisions, collects their commands, hands them to Kasmina and counts failures."""

    def decide(self) -> None:
        """Evaluate, build the packet and submit it to the controller; its command is collected and handed
        to Kasmina `decision_lag_steps` later (at once with no lag)."""
        evaluation = self._evaluate()
        for slot_id, contribution in evaluation.contributions.items():
            self.manager.record_contribution(
                slot_id, accuracy=contribution.accuracy, loss=contribution.loss, step=self.step
            )
        self.best_val_accuracy = max(self.best_val_accuracy, evaluation.accuracy)
        training_loss = self.interval_loss_sum / max(1, self.interval_loss_count)
        self.interval_loss_sum, self.interval_loss_count = 0.0, 0
        device = f"{self.device.type}:{self.device.index or 0}"
        packet = build_packet(
            training_run_id=self.training_run_id,
            experiment_name=self.dataset.name,
            epoch=self.step // self.steps_per_epoch,
            global_step=self.step,
            validation_loss=evaluation.loss,
            validation_accuracy=evaluation.accuracy,
            training_loss=training_loss,
            timestamp_ns=self.clock.wall_ns(),
            topology=self._host_topology()[0],
            device=device,
            hardware=None if self.settings.hardware_context else unmeasured_hardware(device),
            seed_states=self.manager.seed_states(
                learning_rate=self.optimizer.lr, steps_per_epoch=self.steps_per_epoch
            ),
            blueprint_ids=self.blueprint_ids,
            training_metrics=self._training_metrics(training_loss),
            growth_states=self.manager.growth_states(
                learning_rate=self.optimizer.lr, steps_per_epoch=self.steps_per_epoch
            ),
            max_parameters=self.settings.max_params,
        )
        self.run_dir.metrics.append(
            self._metrics_record(evaluation, final=False, training_loss=training_loss)
        )
        self.decisions += 1
        record: dict[str, Any] = {
            "step": self.step,
            "epoch": packet.current_epoch,
            "packet_id": packet.packet_id,
            "validation_accuracy": evaluation.accuracy,
            "validation_loss": evaluation.loss,
        }
        self.collect_decision()  # a lag of `decision_interval` is due now; never two in flight
        topology = self._host_topology()[1]
        try:
            if topology != self._prepared_topology:
                self.controller.prepare(packet)
                self._prepared_topology = topology
            self.controller.submit(packet)
        except DecisionDeadlineMissed as exc:  # a controller that decides as it is submitted
            self._missed(record, exc)
            return
        except EsperError as exc:
            self._failed(record, exc)
            return
        slots = {state.slot_id: (state.stage, state.seed_id) for state in packet.seed_states}
        self._in_flight = _InFlight(self.step + self.settings.decision_lag_steps, record, topology, slots)
        if self.settings.decision_lag_steps == 0:
            self.collect_decision()

    def collect_decision(self, *, drop: str = "") -> None:
        """Collect the decision in flight, if any, and hand its command to Kasmina (or, with `drop`, say
        why it is dropped unapplied). Waits at most for what is left of the controller's budget."""
        flight = self._in_flight
        if flight is None:
            return
        self._in_flight = None
        record = flight.record
        record["applied_step"] = self.step
        try:
            command = self.controller.collect()
        except DecisionDeadlineMissed as exc:
            self._missed(record, exc)
            return
        except EsperError as exc:
            self._failed(record, exc)
            return
        self.controller_failures = 0
        self.consecutive_misses = 0
        record.update(_command_record(command))
        stale = drop or self._staleness(flight, command)
        if stale:
            record.update(accepted=False, dropped=stale)
            self.run_dir.decisions.append(record)
            self._log_trainer_event(
                "decision_dropped",
                reason=stale,
                detail={"command_id": command.command_id, "decided_at_step": record["step"]},
            )
            return
        result = self.manager.apply(command, step=self.step)
        if command.command_type not in (pb.COMMAND_WAIT, pb.COMMAND_OPTIMIZER):
            self._host_changed()  # a seed operation: what it changed shows in events and parameters too
        if result.accepted and command.command_type == pb.COMMAND_OPTIMIZER:
            self._adjust_lr(command.optimizer_adjustment.hyperparameters.get("lr_factor", 1.0))
        self._apply_parameter_changes()
        self._flush_events()
        record.update(
            accepted=result.accepted,
            rejection=result.reason.value if result.reason else "",
            detail=result.detail,
        )
        self.run_dir.decisions.append(record)

    def _staleness(self, flight: _InFlight, command: pb.AdaptationCommand) -> str:
        """Why `command` no longer fits the host ("" when it still does): the host's topology changed
        since its packet, or the slot it operates on changed stage or seed."""
        if self._host_topology()[1] != flight.topology:
            return "the host's topology changed while the decision was in flight"
        if command.HasField("seed_operation"):
            slot_id = command.seed_operation.slot_id
            decided = flight.slots.get(slot_id)
            if decided is not None and slot_id in self.manager.slot_ids:
                now = (self.manager.stage(slot_id), self.manager.seed_id(slot_id))
                if now != decided:
                    before = f"{stage_name(decided[0])} {decided[1] or '-'}"
                    after = f"{stage_name(now[0])} {now[1] or '-'}"
                    return f"slot {slot_id} changed while the decision was in flight ({before} -> {after})"
        return ""

    def _missed(self, record: dict[str, Any], exc: DecisionDeadlineMissed) -> None:
        """A decision not back within the controller's budget: no command, a CRITICAL event, counted; a
        streak of `max_consecutive_misses` stops the run."""
        self.deadline_misses += 1
        self.consecutive_misses += 1
        record.update(missed=True, error=f"{type(exc).__name__}: {exc}")
        self.run_dir.decisions.append(record)
        self._log_trainer_event(
            "decision_deadline_missed",
            reason=str(exc),
            detail={"decided_at_step": record["step"], "consecutive": self.consecutive_misses},
            level="CRITICAL",
        )
        if self.consecutive_misses >= self.settings.max_consecutive_misses:
            raise DecisionsMissed(self.step, self.consecutive_misses, exc) from exc

    def _failed(self, record: dict[str, Any], exc: EsperError) -> None:
        self.controller_failures += 1
        record.update(error=f"{type(exc).__name__}: {exc}")
        self.run_dir.decisions.append(record)
        self._log_trainer_event("controller_failed", reason=str(exc))
        if self.controller_failures >= self.settings.max_controller_failures:
            raise ControllerFailed(self.step, self.controller_failures, exc) from exc


def _command_record(command: pb.AdaptationCommand) -> dict[str, Any]:
    record: dict[str, Any] = {
        "command_id": command.command_id,
        "command_type": value_label(pb.CommandType, command.command_type),
        "issued_by": command.issued_by,
        "target_seed_id": command.target_seed_id,
        "annotations": dict(command.annotations),
    }
    if command.HasField("seed_operation"):
        operation = command.seed_operation
        record.update(
            operation=value_label(pb.SeedOperation, operation.operation),
            slot_id=operation.slot_id,
            blueprint_id=operation.blueprint_id,
            blend_mode=value_label(pb.BlendMode, operation.blend_mode),
            alpha_ramp_steps=operation.alpha_ramp_steps,
        )
    return record
