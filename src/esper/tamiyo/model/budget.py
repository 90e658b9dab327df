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
from collections.abc import Callable, Sequence

from esper.leyline import pb
from esper.urza import BlueprintNotApplicable, UrzaError, param_count

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


@functools.lru_cache(maxsize=4096)
def fits_slot(blueprint_id: str, width: int, kind: str) -> bool:
    """False for a built-in blueprint that cannot be built in a slot of this kind and width (a conv
    blueprint offered to a Linear slot of a host that has both); True otherwise. A blueprint this process
    does not know is left to the risk gates and to Kasmina, which refuse what does not fit."""
    try:
        param_count(blueprint_id, width, kind)
    except BlueprintNotApplicable:
        return False
    except UrzaError:
        return True
    return True


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


# Kernel positions of an identity block's expanding layer, by the kind of the slot it sits on.
_BLOCK_KERNEL = {"mlp": 1, "conv1d": 3, "conv": 9}


def growth_parameter_cost(
    packet: pb.SystemStatePacket, action: int, layer_id: str, *, units: int = 0, hidden: int = 0
) -> tuple[int | None, str]:
    """Parameters a WIDEN (`units`) or DEEPEN (`hidden`, 0: the layer's width) of `layer_id` adds, counted
    from the packet's topology; (None, why) when the topology does not say.

    A WIDEN adds `units` rows to the layer (its parameters per output unit: weight row and bias) and as
    many fan-in columns to the layer after it in topology order (the hosts list every layer in forward
    order, the consumer of a widened layer next): that layer's weight parameters per unit of this
    layer's width. A DEEPEN adds an identity block on the slot after the layer: an expanding layer
    (kernel 1, 3 or 3x3 by the slot's kind: mlp, conv1d, conv) to `hidden` and a 1x1 projection back.
    """
    layers = list(packet.topology.layers)
    index = next((i for i, layer in enumerate(layers) if layer.layer_id == layer_id), None)
    if index is None:
        return None, f"layer {layer_id!r} is not in the topology"
    width = int(layers[index].width)
    if width < 1:
        return None, f"layer {layer_id!r} reports width {width}"
    if action == pb.POLICY_ACTION_WIDEN:
        if units < 1:
            return None, f"layer {layer_id!r} cannot be widened by {units}"
        per_unit, why = widen_unit_cost(layers, index)
        return (None, why) if per_unit is None else (units * per_unit, "")
    if action == pb.POLICY_ACTION_DEEPEN:
        return deepen_cost(packet.topology, layer_id, hidden)
    return None, f"{pb.PolicyAction.Name(action)} is not a growth"


def widen_unit_cost(layers: Sequence[pb.LayerDescriptor], index: int) -> tuple[int | None, str]:
    """Parameters one more unit of `layers[index]` adds (its row and the fan-in column of the layer
    after it, see `growth_parameter_cost`); (None, why) when the topology does not say."""
    layer = layers[index]
    width = int(layer.width)
    if width < 1 or index + 1 >= len(layers):
        return None, f"layer {layer.layer_id!r} cannot be widened (no layer after it)"
    consumer = layers[index + 1]
    per_row, rows_rest = divmod(int(layer.parameter_count), width)
    per_column, columns_rest = divmod(int(consumer.parameter_count) - int(consumer.width), width)
    if rows_rest or columns_rest or per_row < 1 or per_column < 1:
        return None, (
            f"the parameters of {layer.layer_id!r} ({layer.parameter_count}) and of {consumer.layer_id!r} "
            f"({consumer.parameter_count}) do not split into units of width {width}"
        )
    return per_row + per_column, ""


def deepen_cost(topology: pb.HostTopology, layer_id: str, hidden: int = 0) -> tuple[int | None, str]:
    """Parameters a DEEPEN after `layer_id` adds (hidden width `hidden`, 0: the slot's width), see
    `growth_parameter_cost`; (None, why) when no slot of a known kind follows the layer."""
    slot = next((s for s in topology.slots if s.layer_id == layer_id), None)
    if slot is None or slot.kind not in _BLOCK_KERNEL:
        return None, f"no slot of a known kind after layer {layer_id!r} anchors a block"
    block_width = int(slot.width)
    inner = hidden or block_width
    return _BLOCK_KERNEL[slot.kind] * block_width * inner + inner + inner * block_width + block_width, ""


def growth_room(packet: pb.SystemStatePacket) -> float:
    """Parameters a growth may still add under the packet's budget: infinite without a budget, minus
    infinity when the packet does not say the model's size (an unmeasured size never passes a budget).
    A growth adding `n` fits exactly when `growth_over_budget` finds nothing: `n <= growth_room(packet)`."""
    budget = int(packet.max_parameters)
    if budget == 0:
        return math.inf
    current = packet.training_metrics.get("param_count")
    if current is None or not math.isfinite(current):
        return -math.inf
    return float(budget - current)


def growth_over_budget(
    packet: pb.SystemStatePacket, action: int, layer_id: str, *, units: int = 0, hidden: int = 0
) -> str | None:
    """Why a WIDEN or DEEPEN of `layer_id` would break the packet's budget (or cannot be counted against
    it); None when it fits or the packet has no budget."""
    budget = int(packet.max_parameters)
    if budget == 0:
        return None
    current = packet.training_metrics.get("param_count")
    if current is None or not math.isfinite(current):
        return (
            f"the packet does not say the model's size (param_count), so the budget {budget} cannot be kept"
        )
    added, why = growth_parameter_cost(packet, action, layer_id, units=units, hidden=hidden)
    if added is None:
        return f"the parameter cost of {pb.PolicyAction.Name(action)} {layer_id!r} is unknown: {why}"
    if current + added > budget:
        operation = "widening" if action == pb.POLICY_ACTION_WIDEN else "deepening after"
        return (
            f"{operation} {layer_id} adds {added} parameters: "
            f"{current:.0f} + {added} > max_parameters {budget}"
        )
    return None
