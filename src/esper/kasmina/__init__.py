"""Kasmina: seed execution (slots in the host's forward pass, lifecycle, blending, isolation).

A host declares `SeedSlot`s; a `SeedManager` owns the seeds planted in them, verifies and applies the
controller's commands, and steps each seed's lifecycle on measured signals.

Names are imported on first use (`esper.leyline.lazy`): importing a settings class or an error of this
package does not load PyTorch.
"""

from typing import TYPE_CHECKING

from esper.leyline.lazy import lazy_exports

if TYPE_CHECKING:
    from esper.kasmina.blending import Blender, ConfidenceGate, InvalidBlendParameters
    from esper.kasmina.deepen import IdentityBlock
    from esper.kasmina.events import CommandResult, EventKind, LifecycleEvent, RejectionReason
    from esper.kasmina.growth import (
        Bridge,
        DeepenSite,
        GrowthMode,
        GrowthNotApplicable,
        ParameterMerge,
        WidenSite,
    )
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
    from esper.kasmina.stack import fold_fossil
    from esper.kasmina.widen import FanInStatistics, UnitGroup, gradmax_fan_in, random_fan_in

_EXPORTS = {
    "Blender": "esper.kasmina.blending",
    "ConfidenceGate": "esper.kasmina.blending",
    "InvalidBlendParameters": "esper.kasmina.blending",
    "IdentityBlock": "esper.kasmina.deepen",
    "CommandResult": "esper.kasmina.events",
    "EventKind": "esper.kasmina.events",
    "LifecycleEvent": "esper.kasmina.events",
    "RejectionReason": "esper.kasmina.events",
    "Bridge": "esper.kasmina.growth",
    "DeepenSite": "esper.kasmina.growth",
    "GrowthMode": "esper.kasmina.growth",
    "GrowthNotApplicable": "esper.kasmina.growth",
    "ParameterMerge": "esper.kasmina.growth",
    "WidenSite": "esper.kasmina.growth",
    "ACTIVE_STAGES": "esper.kasmina.lifecycle",
    "BLEND_STAGES": "esper.kasmina.lifecycle",
    "LEGAL_TRANSITIONS": "esper.kasmina.lifecycle",
    "IllegalTransition": "esper.kasmina.lifecycle",
    "SeedLifecycle": "esper.kasmina.lifecycle",
    "gate_name": "esper.kasmina.lifecycle",
    "stage_name": "esper.kasmina.lifecycle",
    "BlueprintSource": "esper.kasmina.manager",
    "ParameterChanges": "esper.kasmina.manager",
    "SeedManager": "esper.kasmina.manager",
    "SeedStateRestoreError": "esper.kasmina.manager",
    "KasminaSettings": "esper.kasmina.settings",
    "SeedModule": "esper.kasmina.slot",
    "SeedSlot": "esper.kasmina.slot",
    "SlotMode": "esper.kasmina.slot",
    "fold_fossil": "esper.kasmina.stack",
    "FanInStatistics": "esper.kasmina.widen",
    "UnitGroup": "esper.kasmina.widen",
    "gradmax_fan_in": "esper.kasmina.widen",
    "random_fan_in": "esper.kasmina.widen",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "ACTIVE_STAGES",
    "BLEND_STAGES",
    "LEGAL_TRANSITIONS",
    "Blender",
    "BlueprintSource",
    "Bridge",
    "CommandResult",
    "ConfidenceGate",
    "DeepenSite",
    "EventKind",
    "FanInStatistics",
    "GrowthMode",
    "GrowthNotApplicable",
    "IdentityBlock",
    "IllegalTransition",
    "InvalidBlendParameters",
    "KasminaSettings",
    "LifecycleEvent",
    "ParameterChanges",
    "ParameterMerge",
    "RejectionReason",
    "SeedLifecycle",
    "SeedManager",
    "SeedModule",
    "SeedSlot",
    "SeedStateRestoreError",
    "SlotMode",
    "UnitGroup",
    "WidenSite",
    "fold_fossil",
    "gate_name",
    "gradmax_fan_in",
    "random_fan_in",
    "stage_name",
]
