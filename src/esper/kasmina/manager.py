"""`SeedManager`: owns the seeds of a host's slots, obeys verified commands, steps their lifecycles.

The trainer calls, in this order on every step: forward/backward, `observe_backward`, optimizer step,
`advance`; every decision interval it measures contributions (`counterfactual`, `record_contribution`),
reads `seed_states`, and hands the controller's command to `apply`. Seed parameters appear and disappear
through `drain_parameter_changes`; what happened is told by `drain_events`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import nn

from esper.kasmina.blending import Blender, ConfidenceGate, InvalidBlendParameters
from esper.kasmina.events import CommandResult, EventKind, LifecycleEvent, RejectionReason
from esper.kasmina.lifecycle import (
    ACTIVE_STAGES,
    BLEND_STAGES,
    BLENDING,
    CULLED,
    DORMANT,
    EMBARGOED,
    FOSSILIZED,
    GERMINATED,
    PROBATIONARY,
    RESETTING,
    SHADOWING,
    TERMINATED,
    TRAINING,
    SeedLifecycle,
    gate_name,
    stage_name,
)
from esper.kasmina.settings import KasminaSettings
from esper.kasmina.slot import SeedModule, SeedSlot, SlotMode
from esper.leyline import (
    ContractViolation,
    EsperError,
    FutureMessage,
    ReplayDetected,
    SignatureError,
    SignatureInvalid,
    SignatureVerifier,
    StaleMessage,
    pb,
    validate_command,
    value_label,
)
from esper.urza import BlueprintNotApplicable, BlueprintQuarantined, UnknownBlueprint

BLEND_PARAMETERS = frozenset({"gate_k", "gate_tau", "alpha_lo", "alpha_hi"})
DEFAULT_BLEND_MODE = pb.BLEND_MODE_RESIDUAL


class BlueprintSource(Protocol):
    """What Kasmina needs of the catalogue (Urza's `BlueprintCatalogue` provides it)."""

    def get(self, blueprint_id: str) -> pb.BlueprintDescriptor:
        """The descriptor, or `UnknownBlueprint`."""
        ...

    def build(self, blueprint_id: str, width: int, kind: str, **params: float) -> nn.Module:
        """A fresh module for a slot, or a typed Urza error."""
        ...


class SeedStateRestoreError(EsperError):
    """A checkpointed seed state cannot be restored onto these slots."""

    def __init__(self, slot_id: str, reason: str) -> None:
        self.slot_id = slot_id
        self.reason = reason
        super().__init__(f"cannot restore slot {slot_id!r}: {reason}")


class _Rejected(Exception):
    """Internal: a command check failed (turned into a `CommandResult` by `apply`)."""

    def __init__(self, reason: RejectionReason, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(detail)


@dataclass(frozen=True)
class ParameterChanges:
    """Seed parameters to add to (per seed id) and retire from the trainer's optimizer."""

    added: tuple[tuple[str, tuple[nn.Parameter, ...]], ...] = ()
    retired: tuple[tuple[str, tuple[nn.Parameter, ...]], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.retired)


@dataclass
class _SlotRecord:
    """Everything the manager knows about one slot."""

    slot: SeedSlot
    lifecycle: SeedLifecycle
    generation: int = 0
    seed_id: str = ""
    blueprint_id: str = ""
    blend_mode: int = 0
    blueprint_params: dict[str, float] = field(default_factory=dict)
    blend_params: dict[str, float] = field(default_factory=dict)
    risk: float = 0.0
    seed_gradient_norm: float | None = None
    isolation_reported: int = 0
    isolation_violations: int = 0
    last_gate_failure: str = ""
    ready_reported: bool = False
    param_count: int = 0


class SeedManager:
    """The seeds of one host: commands in (verified), lifecycle steps, seed states and events out."""

    def __init__(
        self,
        slots: Sequence[SeedSlot],
        catalogue: BlueprintSource,
        verifier: SignatureVerifier,
        settings: KasminaSettings,
        *,
        training_run_id: str,
    ) -> None:
        if not training_run_id:
            raise ValueError("training_run_id is required")
        self.settings = settings
        self.training_run_id = training_run_id
        self._catalogue = catalogue
        self._verifier = verifier
        self._records: dict[str, _SlotRecord] = {}
        for slot in slots:
            if slot.slot_id in self._records:
                raise ValueError(f"duplicate slot id {slot.slot_id!r}")
            self._records[slot.slot_id] = _SlotRecord(
                slot=slot, lifecycle=SeedLifecycle(settings), seed_id=slot.slot_id
            )
        self._events: list[LifecycleEvent] = []
        self._added: list[tuple[str, tuple[nn.Parameter, ...]]] = []
        self._retired: list[tuple[str, tuple[nn.Parameter, ...]]] = []
        self._paused = False

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
            if record.slot.seed is not None:
                groups.append((record.seed_id, tuple(record.slot.seed.parameters())))
        return groups

    def seed_parameter_count(self, *, fossilized_only: bool = False) -> int:
        """Parameters held by seeds (only fossilised ones when asked)."""
        return sum(
            r.param_count
            for r in self._records.values()
            if r.slot.seed is not None and (not fossilized_only or r.lifecycle.stage == FOSSILIZED)
        )

    def measurable_slots(self) -> list[str]:
        """Slots whose seed reaches the host output with a ramped alpha: the counterfactual candidates."""
        return [
            slot_id
            for slot_id, r in self._records.items()
            if r.lifecycle.stage in (BLENDING, SHADOWING, PROBATIONARY) and r.lifecycle.alpha > 0
        ]

    # -- measurement ----------------------------------------------------------------------------------------

    @contextmanager
    def counterfactual(self, slot_id: str) -> Iterator[None]:
        """Within the block, the seed of `slot_id` acts with alpha forced to 0."""
        slot = self._record(slot_id).slot
        previous = slot.alpha_override
        slot.alpha_override = 0.0
        try:
            yield
        finally:
            slot.alpha_override = previous

    def record_contribution(self, slot_id: str, *, accuracy: float, loss: float, step: int) -> None:
        """A counterfactual measurement: accuracy gained and loss avoided thanks to the seed."""
        if not (math.isfinite(accuracy) and math.isfinite(loss)):
            raise ValueError(f"contribution of {slot_id} must be finite, got {accuracy}, {loss}")
        self._record(slot_id).lifecycle.record_contribution(accuracy, loss, step)

    def arm_gradient_probes(self) -> None:
        """Measure the host gradient at every empty slot on the next training step."""
        for record in self._records.values():
            if record.slot.seed is None:
                record.slot.arm_gradient_probe()

    def observe_backward(self, step: int) -> None:
        """Read what the backward pass measured: seed gradient norms, training gains, isolation."""
        for record in self._records.values():
            slot, lifecycle = record.slot, record.lifecycle
            if slot.seed is None:
                continue
            grads = [p.grad for p in slot.seed.parameters() if p.grad is not None]
            if grads:
                record.seed_gradient_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
                lifecycle.record_gradient_norm(record.seed_gradient_norm)
            for gain in slot.training_gains:
                lifecycle.record_training_gain(gain)
            slot.training_gains.clear()
            if slot.isolation_violations > record.isolation_reported:
                new = slot.isolation_violations - record.isolation_reported
                record.isolation_reported = slot.isolation_violations
                record.isolation_violations += new
                self._emit(
                    EventKind.ISOLATION_VIOLATION,
                    step,
                    record,
                    reason=f"{new} foreign leaf tensor(s) reachable from the seed's output",
                    detail={"violations_total": record.isolation_violations},
                )

    # -- the step -------------------------------------------------------------------------------------------

    def advance(self, step: int) -> list[LifecycleEvent]:
        """Step every lifecycle once (at most one gate each); returns the events of this call."""
        start = len(self._events)
        if self._paused:
            return []
        for record in self._records.values():
            self._advance_one(record, step)
        return self._events[start:]

    def _advance_one(self, record: _SlotRecord, step: int) -> None:
        slot, lifecycle = record.slot, record.lifecycle
        if lifecycle.stage == GERMINATED and slot.sanity is not None:
            lifecycle.record_sanity(*slot.sanity)
        if lifecycle.stage == RESETTING:
            lifecycle.record_slot_clean(slot.is_clean())
        outcome = lifecycle.advance()
        gate = outcome.gate
        if (
            gate is not None
            and gate.failed
            and _failure_key(lifecycle, gate.gate) != record.last_gate_failure
        ):
            # Reported once per gate and stage visit, and again for each new contribution measurement.
            record.last_gate_failure = _failure_key(lifecycle, gate.gate)
            self._emit(EventKind.GATE_FAILED, step, record, gate=gate_name(gate.gate), reason=gate.reason)
        if outcome.moved:
            record.last_gate_failure = ""
            self._emit(
                EventKind.TRANSITION,
                step,
                record,
                from_stage=stage_name(outcome.from_stage),
                to_stage=stage_name(outcome.to_stage),
                gate=gate_name(gate.gate) if gate is not None else "",
                reason=gate.reason if gate is not None else "",
            )
            if outcome.to_stage == DORMANT:
                record.seed_id = slot.slot_id
                record.blueprint_id = ""
                record.blend_mode = 0
                record.param_count = 0
        elif outcome.from_stage == PROBATIONARY and gate is not None:
            if lifecycle.fossilize_ready and not record.ready_reported:
                self._emit(EventKind.GATE_PASSED, step, record, gate=gate_name(gate.gate), reason=gate.reason)
            record.ready_reported = lifecycle.fossilize_ready
        # A seed whose output failed G0 never enters training: it is culled on the spot.
        if lifecycle.stage == GERMINATED and gate is not None and gate.failed:
            self._cull(record, step, reason=f"G0 failed: {gate.reason}")
        self._sync_slot(record)

    def terminate(self, step: int) -> list[LifecycleEvent]:
        """End of run: every seed still on its way (or cooling down) becomes TERMINATED."""
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
        operation = command.seed_operation
        record = self._records.get(operation.slot_id)
        if record is None:
            raise _Rejected(RejectionReason.UNKNOWN_SLOT, f"no slot {operation.slot_id!r} in this host")
        if command.target_seed_id != record.seed_id:
            raise _Rejected(
                RejectionReason.WRONG_TARGET,
                f"command targets seed {command.target_seed_id!r}, slot holds {record.seed_id!r}",
            )
        op = operation.operation
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

    def _descriptor(self, blueprint_id: str, kind: str) -> pb.BlueprintDescriptor:
        try:
            descriptor = self._catalogue.get(blueprint_id)
        except UnknownBlueprint as exc:
            raise _Rejected(RejectionReason.UNKNOWN_BLUEPRINT, str(exc)) from exc
        if descriptor.quarantine:
            raise _Rejected(RejectionReason.QUARANTINED_BLUEPRINT, f"blueprint {blueprint_id} is quarantined")
        if kind not in descriptor.host_kinds:
            raise _Rejected(
                RejectionReason.BLUEPRINT_NOT_APPLICABLE,
                f"blueprint {blueprint_id} serves {list(descriptor.host_kinds)}, slot is {kind}",
            )
        return descriptor

    def _build_seed(
        self,
        blueprint_id: str,
        slot: SeedSlot,
        blend_mode: int,
        blueprint_params: Mapping[str, float],
        blend_params: dict[str, float],
        *,
        checked: bool,
    ) -> SeedModule:
        try:
            confidence = ConfidenceGate.from_parameters(blend_params)
            blender = Blender(blend_mode, slot.width, confidence)
            body = self._catalogue.build(blueprint_id, slot.width, slot.kind, **blueprint_params)
        except InvalidBlendParameters as exc:
            if not checked:
                raise SeedStateRestoreError(slot.slot_id, str(exc)) from exc
            raise _Rejected(RejectionReason.INVALID_PARAMETERS, str(exc)) from exc
        except UnknownBlueprint as exc:
            if not checked:
                raise SeedStateRestoreError(slot.slot_id, str(exc)) from exc
            raise _Rejected(RejectionReason.UNKNOWN_BLUEPRINT, str(exc)) from exc
        except BlueprintQuarantined as exc:
            if not checked:
                raise SeedStateRestoreError(slot.slot_id, str(exc)) from exc
            raise _Rejected(RejectionReason.QUARANTINED_BLUEPRINT, str(exc)) from exc
        except BlueprintNotApplicable as exc:
            if not checked:
                raise SeedStateRestoreError(slot.slot_id, str(exc)) from exc
            raise _Rejected(RejectionReason.BLUEPRINT_NOT_APPLICABLE, str(exc)) from exc
        return SeedModule(body, blender)

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

    def _retire_module(self, record: _SlotRecord) -> None:
        seed = record.slot.remove()
        if seed is not None:
            self._retired.append((record.seed_id, tuple(seed.parameters())))

    def _sync_slot(self, record: _SlotRecord) -> None:
        slot, lifecycle = record.slot, record.lifecycle
        stage = lifecycle.stage
        slot.alpha = lifecycle.alpha
        if slot.seed is None:
            if slot.mode != SlotMode.PROBE:
                slot.mode = SlotMode.IDENTITY
        elif stage == GERMINATED:
            slot.mode = SlotMode.SANITY
        elif stage == TRAINING:
            slot.mode = SlotMode.INCUBATE
        elif stage in BLEND_STAGES and stage != FOSSILIZED:
            slot.mode = SlotMode.BLEND
        elif stage == FOSSILIZED:
            slot.mode = SlotMode.FOSSIL

    # -- outputs --------------------------------------------------------------------------------------------

    def seed_states(self, *, learning_rate: float, steps_per_epoch: int) -> list[pb.SeedState]:
        """One `SeedState` per slot, dormant ones included, in host order."""
        states = []
        for slot_id, record in self._records.items():
            lifecycle, slot = record.lifecycle, record.slot
            dormant = lifecycle.stage == DORMANT
            gradient = slot.host_gradient_norm if dormant else record.seed_gradient_norm
            contribution = lifecycle.contribution
            state = pb.SeedState(
                seed_id=record.seed_id,
                slot_id=slot_id,
                stage=lifecycle.stage,
                gradient_norm=gradient if gradient is not None and math.isfinite(gradient) else 0.0,
                learning_rate=learning_rate,
                layer_depth=slot.depth,
                age_steps=lifecycle.age_steps,
                age_epochs=lifecycle.age_steps // max(1, steps_per_epoch),
                risk_score=record.risk,
                blueprint_id=record.blueprint_id,
                blend_mode=record.blend_mode,
            )
            state.metrics.update(
                {
                    "alpha": lifecycle.alpha,
                    "alpha_steps": float(lifecycle.alpha_steps),
                    "alpha_total_steps": float(lifecycle.alpha_total_steps),
                    "blend_allowed": 1.0 if lifecycle.stage in BLEND_STAGES else 0.0,
                    "stage_steps": float(lifecycle.stage_steps),
                    "contribution_accuracy": contribution.accuracy if contribution else 0.0,
                    "contribution_loss": contribution.loss if contribution else 0.0,
                    "contribution_measured": 1.0 if contribution else 0.0,
                    "isolation_violations": float(record.isolation_violations),
                    "param_count": float(record.param_count),
                    "gradient_measured": 1.0 if gradient is not None and math.isfinite(gradient) else 0.0,
                    "fossilize_ready": 1.0 if lifecycle.fossilize_ready else 0.0,
                    "embargo_remaining": float(
                        max(0, self.settings.embargo_steps - lifecycle.stage_steps)
                        if lifecycle.stage == EMBARGOED
                        else 0
                    ),
                }
            )
            states.append(state)
        return states

    def drain_parameter_changes(self) -> ParameterChanges:
        """Seed parameters added and retired since the last call."""
        changes = ParameterChanges(added=tuple(self._added), retired=tuple(self._retired))
        self._added.clear()
        self._retired.clear()
        return changes

    def drain_events(self) -> list[LifecycleEvent]:
        """Every event since the last call, oldest first."""
        events = list(self._events)
        self._events.clear()
        return events

    # -- persistence ----------------------------------------------------------------------------------------

    def export_state(self) -> dict[str, Any]:
        """JSON-ready state of every slot (seed weights live in the host's state dict)."""
        slots = {}
        for slot_id, r in self._records.items():
            slots[slot_id] = {
                "lifecycle": r.lifecycle.export_state(),
                "generation": r.generation,
                "seed_id": r.seed_id,
                "blueprint_id": r.blueprint_id,
                "blend_mode": r.blend_mode,
                "blueprint_params": r.blueprint_params,
                "blend_params": r.blend_params,
                "risk": r.risk,
                "seed_gradient_norm": r.seed_gradient_norm,
                "isolation_violations": r.isolation_violations,
                "param_count": r.param_count,
                "has_module": r.slot.seed is not None,
            }
        return {"paused": self._paused, "slots": slots}

    def export_nonces(self) -> list[list[Any]]:
        """The nonces of the commands accepted within the replay window, with their expiry (JSON-ready).

        Saved with each checkpoint apart from `export_state` (they are random, the slots' state is not):
        after a restart, a command seen before the checkpoint is still refused as a replay."""
        ledger = self._verifier.ledger
        return [[nonce, expiry] for nonce, expiry in ledger.entries(self._verifier.now())]

    def restore_nonces(self, entries: Sequence[Sequence[Any]]) -> None:
        """Remember the nonces `export_nonces` saved, and those seen since (a rollback forgets none)."""
        try:
            parsed = [(str(nonce), float(expiry)) for nonce, expiry in entries]
        except (TypeError, ValueError) as exc:
            raise SeedStateRestoreError("*", f"saved nonces are not [nonce, expiry] pairs: {exc}") from exc
        self._verifier.ledger.merge(parsed, self._verifier.now())

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Rebuild every slot from `export_state` output: modules are rebuilt empty (load weights next)."""
        slots = state["slots"]
        if set(slots) != set(self._records):
            raise SeedStateRestoreError(
                ",".join(sorted(set(slots) ^ set(self._records))), "checkpoint slots differ from the host's"
            )
        for slot_id, saved in slots.items():
            record = self._records[slot_id]
            record.slot.remove()
            record.lifecycle = SeedLifecycle.from_state(self.settings, saved["lifecycle"])
            record.generation = int(saved["generation"])
            record.seed_id = str(saved["seed_id"])
            record.blueprint_id = str(saved["blueprint_id"])
            record.blend_mode = int(saved["blend_mode"])
            record.blueprint_params = {k: float(v) for k, v in saved["blueprint_params"].items()}
            record.blend_params = {k: float(v) for k, v in saved["blend_params"].items()}
            record.risk = float(saved["risk"])
            norm = saved["seed_gradient_norm"]
            record.seed_gradient_norm = None if norm is None else float(norm)
            record.isolation_violations = int(saved["isolation_violations"])
            record.isolation_reported = 0
            record.param_count = int(saved["param_count"])
            record.last_gate_failure = ""
            if saved["has_module"]:
                seed = self._build_seed(
                    record.blueprint_id,
                    record.slot,
                    record.blend_mode,
                    record.blueprint_params,
                    record.blend_params,
                    checked=False,
                )
                record.slot.install(seed)
                if record.lifecycle.stage == GERMINATED and record.lifecycle.sanity_ok is not None:
                    record.slot.sanity = (record.lifecycle.sanity_ok, record.lifecycle.sanity_reason)
            self._sync_slot(record)
        self._paused = bool(state["paused"])
        self._added.clear()
        self._retired.clear()
        self._events.clear()

    # -- internals ------------------------------------------------------------------------------------------

    def _record(self, slot_id: str) -> _SlotRecord:
        record = self._records.get(slot_id)
        if record is None:
            raise KeyError(f"no slot {slot_id!r}; slots are {list(self._records)}")
        return record

    def _emit(self, kind: EventKind, step: int, record: _SlotRecord, **fields: Any) -> None:
        self._events.append(
            LifecycleEvent(
                kind=kind, step=step, slot_id=record.slot.slot_id, seed_id=record.seed_id, **fields
            )
        )

    def _emit_command(self, command: pb.AdaptationCommand, step: int, what: str) -> None:
        operation = command.seed_operation if command.HasField("seed_operation") else None
        slot_id = operation.slot_id if operation is not None else ""
        self._events.append(
            LifecycleEvent(
                kind=EventKind.COMMAND_APPLIED,
                step=step,
                slot_id=slot_id,
                seed_id=command.target_seed_id,
                reason=what,
                command_id=command.command_id,
            )
        )


def _failure_key(lifecycle: SeedLifecycle, gate: int) -> str:
    measured = lifecycle.contribution
    measurement = measured.step if measured is not None and measured.stage == lifecycle.stage else -1
    return f"{gate}:{measurement}"
