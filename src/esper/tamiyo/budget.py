"""The growth budget: what a germination would add to the model, and whether the packet's budget has room.

The packet carries the budget (`max_parameters`, 0 for none) and the model's size now
(`training_metrics["param_count"]`). A germination adds its seed: the blueprint's module built at the
slot's width and kind, plus a CHANNEL blender's per-channel gates. Whatever cannot be counted (the size is
missing from the packet, the slot is not in the topology, the blueprint's cost is unknown) does not fit:
an unmeasured cost never passes a budget.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

from esper.leyline import pb
from esper.urza import UrzaError, param_count

ParameterCost = Callable[[str, int, str], "int | None"]
"""Parameters a blueprint's module has at a slot's (width, kind), or None when it cannot be counted."""


@functools.lru_cache(maxsize=4096)
def builtin_parameter_cost(blueprint_id: str, width: int, kind: str) -> int | None:
    """Parameters of the built-in blueprint at its default parameters, counted on a module really built;
    None for a blueprint that is not built in or does not fit the slot."""
    try:
        return param_count(blueprint_id, width, kind)
    except UrzaError:
        return None


def over_budget(
    packet: pb.SystemStatePacket,
    slot_id: str,
    blueprint_id: str,
    blend_mode: int,
    cost: ParameterCost = builtin_parameter_cost,
) -> str | None:
    """Why germinating `blueprint_id` in `slot_id` would break the packet's budget; None when it fits
    (or the packet has no budget)."""
    budget = int(packet.max_parameters)
    if budget == 0:
        return None
    current = packet.training_metrics.get("param_count")
    if current is None or not math.isfinite(current):
        return (
            f"the packet does not say the model's size (param_count), so the budget {budget} cannot be kept"
        )
    slot = next((s for s in packet.topology.slots if s.slot_id == slot_id), None)
    if slot is None:
        return f"slot {slot_id!r} is not in the topology, so its cost against the budget {budget} is unknown"
    added = cost(blueprint_id, int(slot.width), str(slot.kind))
    if added is None:
        return f"the parameter cost of blueprint {blueprint_id!r} in slot {slot_id!r} is unknown"
    if blend_mode == pb.BLEND_MODE_CHANNEL:
        added += int(slot.width)
    if current + added > budget:
        return (
            f"germinating {blueprint_id} in slot {slot_id} adds {added} parameters: "
            f"{current:.0f} + {added} > max_parameters {budget}"
        )
    return None
