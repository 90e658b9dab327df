"""`SeedManager`: owns the seeds of a host's slots, obeys verified commands, steps their lifecycles.

The trainer calls, in this order on every step: forward/backward, `observe_backward`, optimizer step,
`advance`; every decision interval it measures contributions (`counterfactual`, `record_contribution`),
reads `seed_states`, and hands the controller's command to `apply`. Seed parameters appear and disappear
through `drain_parameter_changes`; what happened is told by `drain_events`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from esper.kasmina.blending import (
    DEFAULT_CHANNEL_ALPHA_INIT,
    Blender,
    ConfidenceGate,
    InvalidBlendParameters,
)
from esper.kasmina.events import CommandResult, EventKind, LifecycleEvent, RejectionReason
from esper.kasmina.growing import (
    Growth,
    GrowthHost,
    gradient_norm,
    growth_container,
    module_key,
    resize,
    restore_growth,
    site_for,
)
from esper.kasmina.growth import GrowthNotApplicable, ParameterMerge, WidenSite, out_units
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
    Advance,
    SeedLifecycle,
    gate_name,
    stage_name,
)
from esper.kasmina.settings import KasminaSettings
from esper.kasmina.slot import SeedModule, SeedSlot, SlotMode
from esper.kasmina.stack import fold_fossil
from esper.kasmina.widen import UnitGroup
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
from esper.urza.errors import BlueprintNotApplicable, BlueprintQuarantined, UnknownBlueprint

BLEND_PARAMETERS = frozenset({"gate_k", "gate_tau", "alpha_lo", "alpha_hi", "channel_alpha_init"})
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
    """Seed and growth parameters to add to (per id) and retire from the trainer's optimizer.

    `merged`: host parameters replaced by a fossilised WIDEN (the optimizer absorbs each, so that the
    merged tensor keeps the old moments and the new units' own; apply them before `retired`).
    """

    added: tuple[tuple[str, tuple[nn.Parameter, ...]], ...] = ()
    retired: tuple[tuple[str, tuple[nn.Parameter, ...]], ...] = ()
    merged: tuple[ParameterMerge, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.retired or self.merged)


_NO_CHANGES = ParameterChanges()


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
    # Seeds stacked into the host from this slot, oldest first: what rebuilds a kept one on restore.
    stacked: list[dict[str, Any]] = field(default_factory=list)


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
        host: GrowthHost | None = None,
        device: torch.device | None = None,
    ) -> None:
        """`host`: the model to grow with WIDEN and DEEPEN (without it those commands are refused).
        `device`: where seeds are placed (None: the device of the host's parameters, the CPU without a
        host); WIDEN and DEEPEN build on the device of the layer they grow."""
        if not training_run_id:
            raise ValueError("training_run_id is required")
        self.settings = settings
        # The lifecycle settings of growths: a seed's, with the growths' own dwell times.
        self._growth_settings = settings.model_copy(
            update={
                "min_training_steps": settings.growth_min_training_steps or settings.min_training_steps,
                "probation_steps": settings.growth_probation_steps or settings.probation_steps,
            }
        )
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
        self._merged: list[ParameterMerge] = []
        self._paused = False
        self._host = host
        self._device = device
        self._container = growth_container(host) if host is not None else None
        self._growths: dict[str, Growth] = {}
        self._growth_count = 0
        # Widths of the layers merged widens changed: now, and as the host was built (for rollbacks).
        self._widths: dict[str, int] = {}
        self._base_widths: dict[str, int] = {}
        # True while every slot is dormant, synced, and no growth exists: `advance` has nothing to do then.
        # Set by a full `advance`; cleared by everything that can change a lifecycle (commands, restore).
        self._at_rest = False

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

    def measurable_slots(self) -> list[str]:
        """Slots whose seed reaches the host output with a ramped alpha: the counterfactual candidates."""
        measured = (BLENDING, SHADOWING, PROBATIONARY)
        return [
            slot_id
            for slot_id, r in self._records.items()
            if r.lifecycle.stage in measured and r.lifecycle.alpha > 0
        ] + [
            growth_id
            for growth_id, g in self._growths.items()
            if g.lifecycle.stage in measured and g.lifecycle.alpha > 0 and g.module is not None
        ]

    # -- measurement ----------------------------------------------------------------------------------------

    @contextmanager
    def counterfactual(self, slot_id: str) -> Iterator[None]:
        """Within the block, the seed of `slot_id` (or the growth of that id) acts with alpha forced to 0."""
        growth = self._growths.get(slot_id)
        if growth is not None:
            growth.sync(alpha_override=0.0)
            try:
                yield
            finally:
                growth.sync()
            return
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
        growth = self._growths.get(slot_id)
        lifecycle = growth.lifecycle if growth is not None else self._record(slot_id).lifecycle
        lifecycle.record_contribution(accuracy, loss, step)

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
                record.seed_gradient_norm = gradient_norm(grads)
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
        for growth in self._growths.values():
            module = growth.module
            if module is None:
                continue
            norm = growth.gradient_norm()
            if norm is not None:
                growth.seed_gradient_norm = norm
                growth.lifecycle.record_gradient_norm(norm)
            for gain in module.training_gains:
                growth.lifecycle.record_training_gain(gain)
            module.training_gains.clear()

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

    # -- growth ---------------------------------------------------------------------------------------------

    def _start_growth(self, command: pb.AdaptationCommand, step: int) -> None:
        """A verified WIDEN or DEEPEN: check the layer and its neighbours, then start the growth."""
        operation = command.seed_operation
        spec = operation.growth
        op = operation.operation
        if self._host is None or self._container is None:
            raise _Rejected(RejectionReason.UNSUPPORTED, "this manager was given no host to grow")
        if command.target_seed_id != spec.layer_id:
            raise _Rejected(
                RejectionReason.WRONG_TARGET,
                f"a growth command targets its layer {spec.layer_id!r}, not {command.target_seed_id!r}",
            )
        try:
            site = site_for(self._host, op, spec.layer_id)
        except GrowthNotApplicable as exc:
            raise _Rejected(RejectionReason.UNKNOWN_LAYER, str(exc)) from exc
        if isinstance(site, WidenSite) and site.slot is not None and len(site.slot.stacked) > 0:
            raise _Rejected(
                RejectionReason.GROWTH_NOT_APPLICABLE,
                f"slot {site.slot.slot_id!r} holds stacked fossils built at {spec.layer_id!r}'s width",
            )
        growth = Growth(
            growth_id=f"{spec.layer_id}:{'w' if op == pb.SEED_OP_WIDEN else 'd'}{self._growth_count + 1}",
            operation=op,
            layer_id=spec.layer_id,
            units=int(spec.units) if op == pb.SEED_OP_WIDEN else 0,
            init=int(spec.init) if op == pb.SEED_OP_WIDEN else 0,
            hidden=int(spec.hidden) if op == pb.SEED_OP_DEEPEN else 0,
            lifecycle=SeedLifecycle(self._growth_settings),
            site=site,
        )
        self._check_growth_fits(growth)
        ramp = operation.alpha_ramp_steps or self.settings.default_alpha_ramp_steps
        if ramp > self.settings.max_alpha_ramp_steps:
            raise _Rejected(
                RejectionReason.INVALID_PARAMETERS,
                f"alpha_ramp_steps {ramp} above {self.settings.max_alpha_ramp_steps}",
            )
        try:
            growth.start()
        except GrowthNotApplicable as exc:
            growth.remove()
            raise _Rejected(RejectionReason.GROWTH_NOT_APPLICABLE, str(exc)) from exc
        self._growth_count += 1
        growth.lifecycle.germinate(ramp)
        self._growths[growth.growth_id] = growth
        if growth.module is not None:
            self._register(growth)
        self._emit_command(command, step, growth.describe())
        self._emit_growth(
            EventKind.TRANSITION,
            step,
            growth,
            from_stage=stage_name(DORMANT),
            to_stage=stage_name(GERMINATED),
            reason=growth.describe(),
            command_id=command.command_id,
        )

    def _check_growth_fits(self, growth: Growth) -> None:
        """Refuse a growth that would break another: shared layers, or a widen under a block."""
        touched = growth.touches()
        for other in self._growths.values():
            if other.lifecycle.stage != FOSSILIZED and touched & other.touches():
                raise _Rejected(
                    RejectionReason.GROWTH_NOT_APPLICABLE,
                    f"growth {other.growth_id!r} ({stage_name(other.lifecycle.stage)}) acts on the same "
                    "layers; one growth per layer at a time",
                )
            if (
                growth.operation == pb.SEED_OP_WIDEN
                and other.operation == pb.SEED_OP_DEEPEN
                and other.layer_id == growth.layer_id
            ):
                raise _Rejected(
                    RejectionReason.GROWTH_NOT_APPLICABLE,
                    f"block {other.growth_id!r} after {growth.layer_id!r} is built at its width; "
                    "widening the layer would break it",
                )

    def _register(self, growth: Growth) -> None:
        assert self._container is not None and growth.module is not None
        self._container[module_key(growth.growth_id)] = growth.module
        self._added.append((growth.growth_id, tuple(growth.module.parameters())))

    def _command_growth(self, growth: Growth, command: pb.AdaptationCommand, step: int) -> None:
        if command.target_seed_id != growth.growth_id:
            raise _Rejected(
                RejectionReason.WRONG_TARGET,
                f"command targets {command.target_seed_id!r}, the growth is {growth.growth_id!r}",
            )
        op = command.seed_operation.operation
        lifecycle = growth.lifecycle
        if op == pb.SEED_OP_CULL:
            if lifecycle.stage not in ACTIVE_STAGES:
                raise _Rejected(
                    RejectionReason.WRONG_STAGE, f"cannot cull a growth in {stage_name(lifecycle.stage)}"
                )
            self._emit_command(command, step, "cull")
            self._cull_growth(growth, step, reason=command.annotations.get("reason", "culled by command"))
        elif op == pb.SEED_OP_FOSSILIZE:
            self._fossilize_growth(growth, command, step)
        else:
            raise _Rejected(
                RejectionReason.UNSUPPORTED,
                f"seed operation {value_label(pb.SeedOperation, op)} does not apply to a growth",
            )

    def _fossilize_growth(self, growth: Growth, command: pb.AdaptationCommand, step: int) -> None:
        lifecycle = growth.lifecycle
        if lifecycle.stage != PROBATIONARY:
            raise _Rejected(
                RejectionReason.WRONG_STAGE, f"cannot fossilise a growth in {stage_name(lifecycle.stage)}"
            )
        if not lifecycle.fossilize_ready:
            raise _Rejected(RejectionReason.GATE_NOT_PASSED, "G4 (probation) has not passed")
        module = growth.module
        assert module is not None
        merges: tuple[ParameterMerge, ...] = ()
        if isinstance(module, UnitGroup):
            site = module.site
            before = out_units(site.producer)
            try:
                merges = module.merge()
            except GrowthNotApplicable as exc:
                raise _Rejected(RejectionReason.GROWTH_NOT_APPLICABLE, str(exc)) from exc
            self._base_widths.setdefault(growth.layer_id, before)
            self._widths[growth.layer_id] = out_units(site.producer)
        lifecycle.fossilize()
        self._emit_command(command, step, "fossilize")
        self._emit_growth(
            EventKind.TRANSITION,
            step,
            growth,
            from_stage=stage_name(PROBATIONARY),
            to_stage=stage_name(FOSSILIZED),
            reason=f"{growth.param_count} parameters become part of the host",
            command_id=command.command_id,
        )
        if merges:
            # The units are in the host's layers now: the group leaves the host and the manager.
            self._merged.extend(merges)
            growth.module = None
            self._unregister(growth)
            self._retired.append((growth.growth_id, ()))
            del self._growths[growth.growth_id]
        else:
            growth.sync()

    def _cull_growth(self, growth: Growth, step: int, *, reason: str) -> None:
        before = growth.lifecycle.stage
        growth.lifecycle.cull()
        self._retire_growth(growth)
        self._emit_growth(
            EventKind.TRANSITION,
            step,
            growth,
            from_stage=stage_name(before),
            to_stage=stage_name(CULLED),
            reason=reason,
        )

    def _retire_growth(self, growth: Growth) -> None:
        had_module = growth.module is not None
        parameters = growth.remove()
        self._unregister(growth)
        if had_module:
            self._retired.append((growth.growth_id, parameters))

    def _unregister(self, growth: Growth) -> None:
        key = module_key(growth.growth_id)
        if self._container is not None and key in self._container:
            del self._container[key]

    def _advance_growth(self, growth: Growth, step: int) -> None:
        lifecycle = growth.lifecycle
        if lifecycle.stage == GERMINATED and growth.ready_to_build(self.settings):
            try:
                growth.build()
            except GrowthNotApplicable as exc:
                self._cull_growth(growth, step, reason=f"G0 failed: {exc}")
                return
            self._register(growth)
        if lifecycle.stage == GERMINATED and growth.module is not None:
            lifecycle.record_sanity(*growth.sanity())
        if lifecycle.stage == RESETTING:
            lifecycle.record_slot_clean(growth.module is None and growth.statistics is None)
        outcome = _advance_reported(
            lifecycle, growth, lambda kind, **fields: self._emit_growth(kind, step, growth, **fields)
        )
        gate = outcome.gate
        if outcome.moved and outcome.to_stage == DORMANT:
            # The embargo after a cull is over: the layers may grow again.
            del self._growths[growth.growth_id]
            return
        if lifecycle.stage == GERMINATED and gate is not None and gate.failed:
            self._cull_growth(growth, step, reason=f"G0 failed: {gate.reason}")
        growth.sync()

    def _emit_growth(self, kind: EventKind, step: int, growth: Growth, **fields: Any) -> None:
        fields.setdefault("detail", {"growth": growth.name, "layer_id": growth.layer_id})
        self._events.append(
            LifecycleEvent(kind=kind, step=step, slot_id=growth.growth_id, seed_id=growth.growth_id, **fields)
        )

    def growth_states(self, *, learning_rate: float, steps_per_epoch: int) -> list[pb.SeedState]:
        """One `SeedState` per growth: slot_id and seed_id are its id, blueprint_id "widen" or "deepen"."""
        states = []
        for growth_id, growth in self._growths.items():
            lifecycle = growth.lifecycle
            gradient = growth.seed_gradient_norm
            contribution = lifecycle.contribution
            state = pb.SeedState(
                seed_id=growth_id,
                slot_id=growth_id,
                stage=lifecycle.stage,
                gradient_norm=gradient if gradient is not None and math.isfinite(gradient) else 0.0,
                learning_rate=learning_rate,
                age_steps=lifecycle.age_steps,
                age_epochs=lifecycle.age_steps // max(1, steps_per_epoch),
                blueprint_id=growth.name,
            )
            state.metrics.update(
                {
                    "alpha": lifecycle.alpha,
                    "stage_steps": float(lifecycle.stage_steps),
                    "contribution_accuracy": contribution.accuracy if contribution else 0.0,
                    "contribution_loss": contribution.loss if contribution else 0.0,
                    "contribution_measured": 1.0 if contribution else 0.0,
                    "param_count": float(growth.param_count),
                    "units": float(growth.units),
                    "fossilize_ready": 1.0 if lifecycle.fossilize_ready else 0.0,
                }
            )
            states.append(state)
        return states

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
            gate = {k: v for k, v in blend_params.items() if k != "channel_alpha_init"}
            channel = blend_params.get("channel_alpha_init", DEFAULT_CHANNEL_ALPHA_INIT)
            blender = Blender(
                blend_mode, slot.width, ConfidenceGate.from_parameters(gate), channel_alpha_init=channel
            )
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
        # Built on the CPU (the same draws on every device), then placed where the host computes.
        return SeedModule(body, blender).to(self._seed_device())

    def _seed_device(self) -> torch.device:
        if self._device is not None:
            return self._device
        if isinstance(self._host, nn.Module):
            for parameter in self._host.parameters():
                return parameter.device
        return torch.device("cpu")

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

    def _stack(self, record: _SlotRecord, step: int) -> None:
        """The fossil in `record`'s slot becomes part of the host (folded into the layer after it where
        its structure allows, else kept as a host module there); the slot is DORMANT again."""
        slot = record.slot
        site = self._fold_site(slot)
        folded_into = ""
        why = "no single host layer consumes this slot's output"
        if site is not None:
            try:
                seed = fold_fossil(site)
            except GrowthNotApplicable as exc:
                why = exc.reason
            else:
                folded_into = site.layer_id
                self._retired.append((record.seed_id, tuple(seed.parameters())))
        if not folded_into:
            fossil = slot.remove()
            assert fossil is not None
            slot.stack(fossil)
        entry: dict[str, Any] = {
            "seed_id": record.seed_id,
            "blueprint_id": record.blueprint_id,
            "blend_mode": record.blend_mode,
            "blueprint_params": dict(record.blueprint_params),
            "blend_params": dict(record.blend_params),
            "param_count": record.param_count,
            "folded": bool(folded_into),
            "step": step,
        }
        record.stacked.append(entry)
        how = (
            f"folded into the layer after {folded_into}" if folded_into else f"kept as a host module ({why})"
        )
        self._emit(
            EventKind.STACKED,
            step,
            record,
            from_stage=stage_name(FOSSILIZED),
            to_stage=stage_name(DORMANT),
            reason=how,
            detail={"folded": bool(folded_into), "param_count": record.param_count},
        )
        record.lifecycle = SeedLifecycle(self.settings)
        record.seed_id = slot.slot_id
        record.blueprint_id = ""
        record.blend_mode = 0
        record.blueprint_params = {}
        record.blend_params = {}
        record.param_count = 0
        record.risk = 0.0
        record.seed_gradient_norm = None
        record.last_gate_failure = ""
        record.ready_reported = False
        self._sync_slot(record)

    def _fold_site(self, slot: SeedSlot) -> WidenSite | None:
        """The site whose consumer takes exactly this slot's output, when nothing else acts between them
        (no block hooked on the slot, no growth in progress on the layers): only then can a fold be exact."""
        if self._host is None or slot.hooked:
            return None
        try:
            site = self._host.widen_site(slot.layer_id)
        except GrowthNotApplicable:
            return None
        if site.slot is not slot:
            return None
        layers = {id(site.producer), id(site.consumer)}
        for growth in self._growths.values():
            building = growth.module is not None or growth.statistics is not None
            if building and growth.touches() & layers:
                return None
        return site

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
                "stacked": [dict(entry) for entry in r.stacked],
                # What was reported already: a resumed run reports a gate's outcome no second time.
                "last_gate_failure": r.last_gate_failure,
                "ready_reported": r.ready_reported,
            }
        growth = {
            "count": self._growth_count,
            "widths": dict(self._widths),
            "base_widths": dict(self._base_widths),
            "growths": [g.export_state() for g in self._growths.values()],
        }
        return {"paused": self._paused, "slots": slots, "growth": growth}

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
        self._at_rest = False
        slots = state["slots"]
        if set(slots) != set(self._records):
            raise SeedStateRestoreError(
                ",".join(sorted(set(slots) ^ set(self._records))), "checkpoint slots differ from the host's"
            )
        for slot_id, saved in slots.items():
            record = self._records[slot_id]
            record.slot.remove()
            record.slot.clear_stacked()
            # Absent from checkpoints written before seeds were stacked.
            record.stacked = [dict(entry) for entry in saved.get("stacked", [])]
            for entry in record.stacked:
                if not entry["folded"]:
                    record.slot.stack(
                        self._build_seed(
                            str(entry["blueprint_id"]),
                            record.slot,
                            int(entry["blend_mode"]),
                            {k: float(v) for k, v in entry["blueprint_params"].items()},
                            {k: float(v) for k, v in entry["blend_params"].items()},
                            checked=False,
                        )
                    )
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
            # Absent from checkpoints written before the reporting memory was saved.
            record.last_gate_failure = str(saved.get("last_gate_failure", ""))
            record.ready_reported = bool(saved.get("ready_reported", False))
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
        self._restore_growth(state.get("growth"))
        self._paused = bool(state["paused"])
        self._added.clear()
        self._retired.clear()
        self._merged.clear()
        self._events.clear()

    def _restore_growth(self, saved: Mapping[str, Any] | None) -> None:
        """Take every growth out, give widened layers their saved widths, rebuild the saved growths."""
        for growth in self._growths.values():
            growth.remove()
            self._unregister(growth)
        self._growths = {}
        saved = saved or {"count": 0, "widths": {}, "base_widths": {}, "growths": []}
        if (saved["growths"] or saved["widths"]) and self._host is None:
            raise SeedStateRestoreError("*", "the checkpoint holds growths and this manager has no host")
        for layer_id, width in saved["base_widths"].items():
            self._base_widths.setdefault(str(layer_id), int(width))
        self._widths = {str(k): int(v) for k, v in saved["widths"].items()}
        host = self._host
        try:
            for layer_id, base in self._base_widths.items():
                assert host is not None
                resize(host, layer_id, self._widths.get(layer_id, base))
            for entry in saved["growths"]:
                assert host is not None
                growth = restore_growth(host, self._growth_settings, entry)
                self._growths[growth.growth_id] = growth
                if growth.module is not None:
                    assert self._container is not None
                    self._container[module_key(growth.growth_id)] = growth.module
        except GrowthNotApplicable as exc:
            raise SeedStateRestoreError("*", f"growth cannot be restored: {exc}") from exc
        self._growth_count = int(saved["count"])

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


class _GateMemory(Protocol):
    """What a seed record and a growth remember of their gates, so each outcome is reported once."""

    last_gate_failure: str
    ready_reported: bool


def _advance_reported(lifecycle: SeedLifecycle, memory: _GateMemory, emit: Callable[..., None]) -> Advance:
    """Step `lifecycle` once and report what happened through `emit(kind, **fields)`: a failed gate
    once per gate and stage visit (and again for each new contribution measurement), every
    transition, and readiness to fossilise once it is reached."""
    outcome = lifecycle.advance()
    gate = outcome.gate
    if gate is not None and gate.failed and _failure_key(lifecycle, gate.gate) != memory.last_gate_failure:
        memory.last_gate_failure = _failure_key(lifecycle, gate.gate)
        emit(EventKind.GATE_FAILED, gate=gate_name(gate.gate), reason=gate.reason)
    if outcome.moved:
        memory.last_gate_failure = ""
        emit(
            EventKind.TRANSITION,
            from_stage=stage_name(outcome.from_stage),
            to_stage=stage_name(outcome.to_stage),
            gate=gate_name(gate.gate) if gate is not None else "",
            reason=gate.reason if gate is not None else "",
        )
    elif outcome.from_stage == PROBATIONARY and gate is not None:
        if lifecycle.fossilize_ready and not memory.ready_reported:
            emit(EventKind.GATE_PASSED, gate=gate_name(gate.gate), reason=gate.reason)
        memory.ready_reported = lifecycle.fossilize_ready
    return outcome
