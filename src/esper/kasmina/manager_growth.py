"""The growth operations of `SeedManager`: WIDEN and DEEPEN from command to fossil, and stacking fossils."""

from __future__ import annotations

from typing import Any

from esper.kasmina.events import EventKind, RejectionReason
from esper.kasmina.growing import Growth, site_for
from esper.kasmina.growth import GrowthNotApplicable, ParameterMerge, WidenSite, out_units
from esper.kasmina.lifecycle import (
    ACTIVE_STAGES,
    CULLED,
    DORMANT,
    FOSSILIZED,
    GERMINATED,
    PROBATIONARY,
    RESETTING,
    SeedLifecycle,
    stage_name,
)
from esper.kasmina.manager_core import _ManagerCore, _Rejected, _SlotRecord
from esper.kasmina.manager_reports import _advance_reported
from esper.kasmina.slot import SeedSlot
from esper.kasmina.stack import fold_fossil
from esper.kasmina.widen import UnitGroup
from esper.leyline import pb, value_label


class _Growing(_ManagerCore):
    """Starts, steps, culls and fossilises growths; stacks a fossilised seed into the host."""

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
