"""The state a `SeedManager` keeps and the helpers its parts share: slot records, events, seed building.

`SeedManager` (manager.py) is assembled from this core and three parts: growth operations
(manager_growth.py), persistence (manager_state.py), and measurements and seed states (manager_reports.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from esper.kasmina.blending import DEFAULT_CHANNEL_ALPHA_INIT, Blender, ConfidenceGate, InvalidBlendParameters
from esper.kasmina.events import EventKind, LifecycleEvent, RejectionReason
from esper.kasmina.growing import Growth, GrowthHost, growth_container, module_key
from esper.kasmina.growth import ParameterMerge
from esper.kasmina.lifecycle import BLEND_STAGES, FOSSILIZED, GERMINATED, TRAINING, SeedLifecycle
from esper.kasmina.settings import KasminaSettings
from esper.kasmina.slot import SeedModule, SeedSlot, SlotMode
from esper.leyline import EsperError, SignatureVerifier, pb
from esper.urza.errors import BlueprintNotApplicable, BlueprintQuarantined, UnknownBlueprint


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

# What building a seed can fail with, and the rejection each one is (the first that matches, in order).
_BUILD_REJECTIONS: dict[type[Exception], RejectionReason] = {
    InvalidBlendParameters: RejectionReason.INVALID_PARAMETERS,
    UnknownBlueprint: RejectionReason.UNKNOWN_BLUEPRINT,
    BlueprintQuarantined: RejectionReason.QUARANTINED_BLUEPRINT,
    BlueprintNotApplicable: RejectionReason.BLUEPRINT_NOT_APPLICABLE,
}
_BUILD_ERRORS = tuple(_BUILD_REJECTIONS)


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


class _ManagerCore:
    """The records of a host's slots and growths, the pending events and parameter changes."""

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

    def _retire_module(self, record: _SlotRecord) -> None:
        seed = record.slot.remove()
        if seed is not None:
            self._retired.append((record.seed_id, tuple(seed.parameters())))

    def _register(self, growth: Growth) -> None:
        assert self._container is not None and growth.module is not None
        self._container[module_key(growth.growth_id)] = growth.module
        self._added.append((growth.growth_id, tuple(growth.module.parameters())))

    def _unregister(self, growth: Growth) -> None:
        key = module_key(growth.growth_id)
        if self._container is not None and key in self._container:
            del self._container[key]

    def _emit_growth(self, kind: EventKind, step: int, growth: Growth, **fields: Any) -> None:
        fields.setdefault("detail", {"growth": growth.name, "layer_id": growth.layer_id})
        self._events.append(
            LifecycleEvent(kind=kind, step=step, slot_id=growth.growth_id, seed_id=growth.growth_id, **fields)
        )

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
        except _BUILD_ERRORS as exc:
            if not checked:
                raise SeedStateRestoreError(slot.slot_id, str(exc)) from exc
            reason = next(r for error, r in _BUILD_REJECTIONS.items() if isinstance(exc, error))
            raise _Rejected(reason, str(exc)) from exc
        # Built on the CPU (the same draws on every device), then placed where the host computes.
        return SeedModule(body, blender).to(self._seed_device())

    def _seed_device(self) -> torch.device:
        if self._device is not None:
            return self._device
        if isinstance(self._host, nn.Module):
            for parameter in self._host.parameters():
                return parameter.device
        return torch.device("cpu")
