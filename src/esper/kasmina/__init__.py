"""Kasmina: seed execution (slots in the host's forward pass, lifecycle, blending, isolation).

A host declares `SeedSlot`s; a `SeedManager` owns the seeds planted in them, verifies and applies the
controller's commands, and steps each seed's lifecycle on measured signals.
"""

from esper.kasmina.blending import Blender, ConfidenceGate, InvalidBlendParameters
from esper.kasmina.events import CommandResult, EventKind, LifecycleEvent, RejectionReason
from esper.kasmina.lifecycle import (
    ACTIVE_STAGES,
    BLEND_STAGES,
    LEGAL_TRANSITIONS,
    IllegalTransition,
    SeedLifecycle,
    gate_name,
    stage_name,
)
from esper.kasmina.manager import BlueprintSource, ParameterChanges, SeedManager, SeedStateRestoreError
from esper.kasmina.settings import KasminaSettings
from esper.kasmina.slot import SeedModule, SeedSlot, SlotMode

__all__ = [
    "ACTIVE_STAGES",
    "BLEND_STAGES",
    "LEGAL_TRANSITIONS",
    "Blender",
    "BlueprintSource",
    "CommandResult",
    "ConfidenceGate",
    "EventKind",
    "IllegalTransition",
    "InvalidBlendParameters",
    "KasminaSettings",
    "LifecycleEvent",
    "ParameterChanges",
    "RejectionReason",
    "SeedLifecycle",
    "SeedManager",
    "SeedModule",
    "SeedSlot",
    "SeedStateRestoreError",
    "SlotMode",
    "gate_name",
    "stage_name",
]
