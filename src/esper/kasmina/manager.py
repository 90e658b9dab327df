"""`SeedManager`: owns the seeds of a host's slots, obeys verified commands, steps their lifecycles.

The trainer calls, in this order on every step: forward/backward, `observe_backward`, optimizer step,
`advance`; every decision interval it measures contributions (`counterfactual`, `record_contribution`),
reads `seed_states`, and hands the controller's command to `apply`. Seed parameters appear and disappear
through `drain_parameter_changes`; what happened is told by `drain_events`.

This module holds the reading side, the lifecycle step and command dispatch; the manager's state and shared
helpers live in manager_core.py, growth operations in manager_growth.py, export and restore in
manager_state.py, measurements and seed states in manager_reports.py.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from esper.kasmina.events import CommandResult, EventKind, LifecycleEvent, RejectionReason
from esper.kasmina.growing import Growth
from esper.kasmina.lifecycle import (
    ACTIVE_STAGES,
    CULLED,
    DORMANT,
    FOSSILIZED,
    GERMINATED,
    PROBATIONARY,
    RESETTING,
    TERMINATED,
    stage_name,
)
from esper.kasmina.manager_core import (
    _NO_CHANGES,
    BlueprintSource,
    ParameterChanges,
    SeedStateRestoreError,
    _Rejected,
    _SlotRecord,
)
from esper.kasmina.manager_growth import _Growing
from esper.kasmina.manager_reports import _advance_reported, _Reporting
from esper.kasmina.manager_state import _Persistence
from esper.leyline import (
    ContractViolation,
    FutureMessage,
    ReplayDetected,
    SignatureError,
    SignatureInvalid,
    StaleMessage,
    pb,
    validate_command,
    value_label,
)

# The catalogue protocol, parameter changes and restore error are defined with the manager's core.
__all__ = ["BlueprintSource", "ParameterChanges", "SeedManager", "SeedStateRestoreError"]

BLEND_PARAMETERS = frozenset({"gate_k", "gate_tau", "alpha_lo", "alpha_hi", "channel_alpha_init"})
DEFAULT_BLEND_MODE = pb.BLEND_MODE_RESIDUAL


class SeedManager(_Growing, _Persistence, _Reporting):
    """The seeds of one host: commands in (verified), lifecycle steps, seed states and events out."""

    # -- reading --------------------------------------------------------------------------------------------

    @property
    def slot_ids(self) -> list[str]:
        """Slot ids in host order."""
        return list(self._records)

    @property
    def paused(self) -> bool:
        """True while a PAUSE command holds every lifecycle where it is."""
        return self._paused

    def stage(self, slot_id: str) -> int:
        """The stage of the seed in `slot_id` (DORMANT when empty)."""
        return self._record(slot_id).lifecycle.stage

    def seed_id(self, slot_id: str) -> str:
        """The id of the seed in `slot_id` (the slot id itself when dormant)."""
        return self._record(slot_id).seed_id

    def alpha(self, slot_id: str) -> float:
        """The blend weight of `slot_id` now."""
        return self._record(slot_id).lifecycle.alpha

    def live_seed_ids(self) -> list[str]:
        """Seeds with a module in their slot that are not yet fossilised."""
        return [r.seed_id for r in self._records.values() if r.lifecycle.stage in ACTIVE_STAGES]

    def seed_parameter_groups(self) -> list[tuple[str, tuple[nn.Parameter, ...]]]:
        """Parameters of every seed with a module (live and fossilised), per seed id, in slot order."""
        groups = []
        for record in self._records.values():
            kept = iter(record.slot.stacked)
            for entry in record.stacked:
                if not entry["folded"]:
                    groups.append((str(entry["seed_id"]), tuple(next(kept).parameters())))
            if record.slot.seed is not None:
                groups.append((record.seed_id, tuple(record.slot.seed.parameters())))
        for growth in self._growths.values():
            if growth.module is not None:
                groups.append((growth.growth_id, tuple(growth.module.parameters())))
        return groups

    @property
    def growth_ids(self) -> list[str]:
        """Ids of the growths the manager holds (live, cooling down, or fossilised deepens)."""
        return list(self._growths)

    def growth(self, growth_id: str) -> Growth:
        """The growth `growth_id` (`KeyError` when there is none)."""
        growth = self._growths.get(growth_id)
        if growth is None:
            raise KeyError(f"no growth {growth_id!r}; growths are {list(self._growths)}")
        return growth

    def seed_parameter_count(self, *, fossilized_only: bool = False) -> int:
        """Parameters held by seeds (only fossilised ones when asked)."""
        return sum(
            r.param_count
            for r in self._records.values()
            if r.slot.seed is not None and (not fossilized_only or r.lifecycle.stage == FOSSILIZED)
        )

    def fossilized_count(self) -> int:
        """Seeds fossilised so far: those still FOSSILIZED in their slot and those stacked into the host."""
        return sum((r.lifecycle.stage == FOSSILIZED) + len(r.stacked) for r in self._records.values())

    def stacked_seeds(self) -> list[dict[str, Any]]:
        """Every seed stacked into the host, per slot in host order, oldest first (JSON-ready)."""
        return [{"slot_id": slot_id, **entry} for slot_id, r in self._records.items() for entry in r.stacked]

    # -- the step -------------------------------------------------------------------------------------------

    def advance(self, step: int) -> list[LifecycleEvent]:
        """Step every lifecycle once (at most one gate each); returns the events of this call."""
        start = len(self._events)
        if self._paused or self._at_rest:
            return []
        for record in self._records.values():
            self._advance_one(record, step)
        for growth in list(self._growths.values()):
            self._advance_growth(growth, step)
        # A dormant lifecycle does not move and a synced empty slot stays as it is: until something changes
        # a lifecycle, the next steps would do nothing.
        records = self._records.values()
        self._at_rest = not self._growths and all(r.lifecycle.stage == DORMANT for r in records)
        return self._events[start:]

    def _advance_one(self, record: _SlotRecord, step: int) -> None:
        slot, lifecycle = record.slot, record.lifecycle
        if lifecycle.stage == FOSSILIZED and self.settings.stack_fossils and slot.seed is not None:
            self._stack(record, step)
            return
        if lifecycle.stage == GERMINATED and slot.sanity is not None:
            lifecycle.record_sanity(*slot.sanity)
        if lifecycle.stage == RESETTING:
            lifecycle.record_slot_clean(slot.is_clean())
        outcome = _advance_reported(
            lifecycle, record, lambda kind, **fields: self._emit(kind, step, record, **fields)
        )
        gate = outcome.gate
        if outcome.moved and outcome.to_stage == DORMANT:
            record.seed_id = slot.slot_id
            record.blueprint_id = ""
            record.blend_mode = 0
            record.param_count = 0
        # A seed whose output failed G0 never enters training: it is culled on the spot.
        if lifecycle.stage == GERMINATED and gate is not None and gate.failed:
            self._cull(record, step, reason=f"G0 failed: {gate.reason}")
        self._sync_slot(record)

    def terminate(self, step: int) -> list[LifecycleEvent]:
        """End of run: every seed still on its way (or cooling down) becomes TERMINATED."""
        self._at_rest = False
        start = len(self._events)
        for record in self._records.values():
            before = record.lifecycle.stage
            if record.lifecycle.terminate():
                self._retire_module(record)
                self._emit(
                    EventKind.TRANSITION,
                    step,
                    record,
                    from_stage=stage_name(before),
                    to_stage=stage_name(TERMINATED),
                    reason="end of run",
                )
                self._sync_slot(record)
        for growth in self._growths.values():
            before = growth.lifecycle.stage
            if growth.lifecycle.terminate():
                self._retire_growth(growth)
                self._emit_growth(
                    EventKind.TRANSITION,
                    step,
                    growth,
                    from_stage=stage_name(before),
                    to_stage=stage_name(TERMINATED),
                    reason="end of run",
                )
        return self._events[start:]

    # -- commands -------------------------------------------------------------------------------------------

    def apply(self, command: pb.AdaptationCommand, *, step: int) -> CommandResult:
        """Verify `command` and apply it; a rejected command changes nothing and says why."""
        start = len(self._events)
        try:
            self._verify(command)
            self._dispatch(command, step)
        except _Rejected as rejection:
            event = LifecycleEvent(
                kind=EventKind.COMMAND_REJECTED,
                step=step,
                slot_id=command.seed_operation.slot_id if command.HasField("seed_operation") else "",
                seed_id=command.target_seed_id,
                reason=rejection.reason.value,
                command_id=command.command_id,
                detail={"detail": rejection.detail},
            )
            self._events.append(event)
            return CommandResult(
                command_id=command.command_id,
                accepted=False,
                reason=rejection.reason,
                detail=rejection.detail,
                events=(event,),
            )
        return CommandResult(command_id=command.command_id, accepted=True, events=tuple(self._events[start:]))

    def _verify(self, command: pb.AdaptationCommand) -> None:
        try:
            self._verifier.verify(command)
        except SignatureInvalid as exc:
            raise _Rejected(RejectionReason.INVALID_SIGNATURE, str(exc)) from exc
        except ReplayDetected as exc:
            raise _Rejected(RejectionReason.REPLAYED, str(exc)) from exc
        except StaleMessage as exc:
            raise _Rejected(RejectionReason.STALE, str(exc)) from exc
        except FutureMessage as exc:
            raise _Rejected(RejectionReason.FUTURE_DATED, str(exc)) from exc
        except SignatureError as exc:
            raise _Rejected(RejectionReason.INVALID_SIGNATURE, str(exc)) from exc
        try:
            validate_command(command)
        except ContractViolation as exc:
            raise _Rejected(RejectionReason.MALFORMED, str(exc)) from exc
        if command.training_run_id != self.training_run_id:
            raise _Rejected(
                RejectionReason.WRONG_RUN,
                f"command is for run {command.training_run_id!r}, this is {self.training_run_id!r}",
            )

    def _dispatch(self, command: pb.AdaptationCommand, step: int) -> None:
        kind = command.command_type
        if kind == pb.COMMAND_PAUSE:
            self._paused = True
            self._emit_command(command, step, "lifecycles held until the next command")
            return
        if kind in (pb.COMMAND_WAIT, pb.COMMAND_OPTIMIZER):
            # The optimizer adjustment is the trainer's to apply once the command is verified here.
            self._paused = False
            return
        if kind != pb.COMMAND_SEED:
            raise _Rejected(
                RejectionReason.UNSUPPORTED,
                f"command type {value_label(pb.CommandType, kind)} is not executed by Kasmina",
            )
        self._at_rest = False  # a seed operation may start a lifecycle or a growth
        operation = command.seed_operation
        op = operation.operation
        if op in (pb.SEED_OP_WIDEN, pb.SEED_OP_DEEPEN):
            self._start_growth(command, step)
            self._paused = False
            return
        growth = self._growths.get(operation.slot_id)
        if growth is not None:
            self._command_growth(growth, command, step)
            self._paused = False
            return
        record = self._records.get(operation.slot_id)
        if record is None:
            raise _Rejected(RejectionReason.UNKNOWN_SLOT, f"no slot {operation.slot_id!r} in this host")
        if command.target_seed_id != record.seed_id:
            raise _Rejected(
                RejectionReason.WRONG_TARGET,
                f"command targets seed {command.target_seed_id!r}, slot holds {record.seed_id!r}",
            )
        if op == pb.SEED_OP_GERMINATE:
            self._germinate(record, command, step)
        elif op == pb.SEED_OP_CULL:
            if record.lifecycle.stage not in ACTIVE_STAGES:
                raise _Rejected(
                    RejectionReason.WRONG_STAGE,
                    f"cannot cull a seed in {stage_name(record.lifecycle.stage)}",
                )
            self._emit_command(command, step, "cull")
            self._cull(record, step, reason=command.annotations.get("reason", "culled by command"))
        elif op == pb.SEED_OP_FOSSILIZE:
            self._fossilize(record, command, step)
        else:
            raise _Rejected(
                RejectionReason.UNSUPPORTED,
                f"seed operation {value_label(pb.SeedOperation, op)} is not supported",
            )
        self._paused = False

    def _germinate(self, record: _SlotRecord, command: pb.AdaptationCommand, step: int) -> None:
        operation = command.seed_operation
        slot, lifecycle = record.slot, record.lifecycle
        if lifecycle.stage != DORMANT:
            raise _Rejected(
                RejectionReason.WRONG_STAGE, f"slot {slot.slot_id} is {stage_name(lifecycle.stage)}"
            )
        ramp = operation.alpha_ramp_steps or self.settings.default_alpha_ramp_steps
        if ramp > self.settings.max_alpha_ramp_steps:
            raise _Rejected(
                RejectionReason.INVALID_PARAMETERS,
                f"alpha_ramp_steps {ramp} above {self.settings.max_alpha_ramp_steps}",
            )
        blend_mode = operation.blend_mode or DEFAULT_BLEND_MODE
        parameters = dict(operation.parameters)
        blend_params = {k: v for k, v in parameters.items() if k in BLEND_PARAMETERS}
        blueprint_params = {k: v for k, v in parameters.items() if k not in BLEND_PARAMETERS}
        descriptor = self._descriptor(operation.blueprint_id, slot.kind)
        seed = self._build_seed(
            operation.blueprint_id, slot, blend_mode, blueprint_params, blend_params, checked=True
        )
        record.generation += 1
        record.seed_id = f"{slot.slot_id}:g{record.generation}"
        record.blueprint_id = operation.blueprint_id
        record.blend_mode = blend_mode
        record.blueprint_params = blueprint_params
        record.blend_params = blend_params
        record.risk = float(descriptor.risk)
        record.seed_gradient_norm = None
        record.isolation_reported = 0
        record.isolation_violations = 0
        record.last_gate_failure = ""
        record.ready_reported = False
        record.param_count = seed.parameter_count()
        slot.install(seed)
        lifecycle.germinate(ramp)
        self._added.append((record.seed_id, tuple(seed.parameters())))
        self._emit_command(command, step, f"germinate {operation.blueprint_id}")
        self._emit(
            EventKind.TRANSITION,
            step,
            record,
            from_stage=stage_name(DORMANT),
            to_stage=stage_name(GERMINATED),
            reason=f"blueprint {operation.blueprint_id}, {record.param_count} parameters",
            command_id=command.command_id,
        )
        self._sync_slot(record)

    def _fossilize(self, record: _SlotRecord, command: pb.AdaptationCommand, step: int) -> None:
        lifecycle = record.lifecycle
        if lifecycle.stage != PROBATIONARY:
            raise _Rejected(
                RejectionReason.WRONG_STAGE, f"cannot fossilise a seed in {stage_name(lifecycle.stage)}"
            )
        if not lifecycle.fossilize_ready:
            raise _Rejected(RejectionReason.GATE_NOT_PASSED, "G4 (probation) has not passed")
        lifecycle.fossilize()
        self._emit_command(command, step, "fossilize")
        self._emit(
            EventKind.TRANSITION,
            step,
            record,
            from_stage=stage_name(PROBATIONARY),
            to_stage=stage_name(FOSSILIZED),
            reason=f"{record.param_count} parameters become part of the host",
            command_id=command.command_id,
        )
        self._sync_slot(record)

    def _cull(self, record: _SlotRecord, step: int, *, reason: str) -> None:
        before = record.lifecycle.stage
        record.lifecycle.cull()
        self._retire_module(record)
        self._emit(
            EventKind.TRANSITION,
            step,
            record,
            from_stage=stage_name(before),
            to_stage=stage_name(CULLED),
            reason=reason,
        )
        self._sync_slot(record)

    # -- outputs --------------------------------------------------------------------------------------------

    def drain_parameter_changes(self) -> ParameterChanges:
        """Seed parameters added and retired since the last call."""
        if not (self._added or self._retired or self._merged):
            return _NO_CHANGES
        changes = ParameterChanges(
            added=tuple(self._added), retired=tuple(self._retired), merged=tuple(self._merged)
        )
        self._added.clear()
        self._retired.clear()
        self._merged.clear()
        return changes

    def drain_events(self) -> list[LifecycleEvent]:
        """Every event since the last call, oldest first."""
        if not self._events:
            return []
        events = list(self._events)
        self._events.clear()
        return events
