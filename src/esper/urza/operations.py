"""The growth operations in the catalogue: WIDEN and DEEPEN described as blueprints are.

A blueprint is a module a seed grows in a slot; a growth operation changes a host layer itself. Both are
what Tamiyo may choose from, so both are described the same way: an id (`op:widen`, `op:deepen`), the
kind, the host layer kinds it applies to, the amounts it may take and what one unit costs in parameters.
Tamiyo's graph builder reads these descriptors (which layers may grow, by which amounts) as it reads
blueprint descriptors. Kasmina applies the operations (`SEED_OP_WIDEN`, `SEED_OP_DEEPEN`).
"""

from __future__ import annotations

from dataclasses import dataclass

from esper.leyline import pb
from esper.urza.errors import UnknownBlueprint


@dataclass(frozen=True)
class GrowthOperation:
    """One growth operation as the catalogue lists it.

    `allowed_amounts`: the unit counts a WIDEN may add (a DEEPEN inserts one block: amount 1).
    `cost_per_unit`: what one unit adds, in parameters, as a formula of the host layer it applies to
    (the exact count is the budget's: `esper.tamiyo`'s growth budget counts it from the packet).
    """

    op_id: str
    kind: str
    seed_operation: int
    host_kinds: tuple[str, ...]
    allowed_amounts: tuple[int, ...]
    cost_per_unit: str
    description: str

    def as_dict(self) -> dict[str, object]:
        """JSON-ready, for listings."""
        return {
            "id": self.op_id,
            "kind": self.kind,
            "seed_operation": pb.SeedOperation.Name(self.seed_operation),
            "host_kinds": list(self.host_kinds),
            "allowed_amounts": list(self.allowed_amounts),
            "cost_per_unit": self.cost_per_unit,
            "description": self.description,
        }


GROWTH_OPERATIONS: tuple[GrowthOperation, ...] = (
    GrowthOperation(
        op_id="op:widen",
        kind="widen",
        seed_operation=pb.SEED_OP_WIDEN,
        host_kinds=("linear", "conv", "conv1d"),
        allowed_amounts=(1, 2, 4, 8, 16, 32),
        cost_per_unit="the layer's parameters per output unit (weights and bias) + the next layer's "
        "weights per input unit",
        description="Widen a host layer by k units or channels, with the fan-in of the layer after it; "
        "new fan-out starts at zero (the function is unchanged), new fan-in from gradient statistics.",
    ),
    GrowthOperation(
        op_id="op:deepen",
        kind="deepen",
        seed_operation=pb.SEED_OP_DEEPEN,
        host_kinds=("linear", "conv", "conv1d"),
        allowed_amounts=(1,),
        cost_per_unit="kernel x width x hidden + hidden + hidden x width + width (an expanding layer to "
        "`hidden`, 0: the layer's width, and a 1x1 projection back)",
        description="Insert a block after a host layer that starts as the identity, on the slot after it.",
    ),
)
_BY_ID = {operation.op_id: operation for operation in GROWTH_OPERATIONS}


def growth_operation(op_id: str) -> GrowthOperation | None:
    """The descriptor of `op_id` (`op:widen`, `op:deepen`), or None (the builder's lookup contract)."""
    return _BY_ID.get(op_id)


def require_growth_operation(op_id: str) -> GrowthOperation:
    """The descriptor of `op_id`; `UnknownBlueprint` names the known ones otherwise."""
    operation = _BY_ID.get(op_id)
    if operation is None:
        raise UnknownBlueprint(op_id, f"not a growth operation; known: {', '.join(_BY_ID)}")
    return operation
