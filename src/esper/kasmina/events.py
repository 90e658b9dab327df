"""Typed records of what Kasmina did: lifecycle events and command results."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class EventKind(StrEnum):
    """What a lifecycle event reports."""

    TRANSITION = "transition"
    GATE_PASSED = "gate_passed"
    GATE_FAILED = "gate_failed"
    ISOLATION_VIOLATION = "isolation_violation"
    COMMAND_APPLIED = "command_applied"
    COMMAND_REJECTED = "command_rejected"
    STACKED = "stacked"  # a fossil became part of the host; its slot is DORMANT again


class RejectionReason(StrEnum):
    """Why a command was refused; a refused command changes nothing."""

    MALFORMED = "malformed"
    INVALID_SIGNATURE = "invalid_signature"
    REPLAYED = "replayed_nonce"
    STALE = "stale"
    FUTURE_DATED = "future_dated"
    WRONG_RUN = "wrong_run"
    UNSUPPORTED = "unsupported_command"
    UNKNOWN_SLOT = "unknown_slot"
    WRONG_TARGET = "wrong_target"
    WRONG_STAGE = "wrong_stage"
    GATE_NOT_PASSED = "gate_not_passed"
    UNKNOWN_BLUEPRINT = "unknown_blueprint"
    QUARANTINED_BLUEPRINT = "quarantined_blueprint"
    BLUEPRINT_NOT_APPLICABLE = "blueprint_not_applicable"
    INVALID_PARAMETERS = "invalid_parameters"
    UNKNOWN_LAYER = "unknown_layer"
    GROWTH_NOT_APPLICABLE = "growth_not_applicable"


@dataclass(frozen=True)
class LifecycleEvent:
    """One thing that happened to a slot, at a training step."""

    kind: EventKind
    step: int
    slot_id: str
    seed_id: str
    from_stage: str = ""
    to_stage: str = ""
    gate: str = ""
    reason: str = ""
    command_id: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the enum as its value)."""
        record = asdict(self)
        record["kind"] = self.kind.value
        return record


@dataclass(frozen=True)
class CommandResult:
    """The outcome of `SeedManager.apply`: accepted, or rejected with a reason and no state change."""

    command_id: str
    accepted: bool
    reason: RejectionReason | None = None
    detail: str = ""
    events: tuple[LifecycleEvent, ...] = ()
