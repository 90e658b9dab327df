"""What a policy proposes: one factored choice over the action, slot, blueprint, blend mode and schedule.

Every policy (the heuristic baseline and the GNN) returns a `Proposal`; the risk gates may override it and
the command factory turns the final one into a signed command. A proposal never invents ids: it names a
slot and a blueprint taken from the packet, or none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from esper.leyline import pb

# The action head, in head order (index i has PolicyAction value i + 1).
ACTIONS: tuple[int, ...] = (
    pb.POLICY_ACTION_WAIT,
    pb.POLICY_ACTION_GERMINATE,
    pb.POLICY_ACTION_FOSSILIZE,
    pb.POLICY_ACTION_CULL,
    pb.POLICY_ACTION_ADJUST_LR,
    pb.POLICY_ACTION_PAUSE,
)
# The blend-mode head, in head order.
BLEND_MODES: tuple[int, ...] = (
    pb.BLEND_MODE_CONVEX,
    pb.BLEND_MODE_RESIDUAL,
    pb.BLEND_MODE_CHANNEL,
    pb.BLEND_MODE_CONFIDENCE,
)
# The schedule head: alpha ramp lengths in steps.
ALPHA_RAMP_STEPS: tuple[int, ...] = (8, 16, 32, 64)
# ADJUST_LR multiplies the learning rate by one of these.
LR_FACTORS: tuple[float, ...] = (0.5, 0.8, 1.25)


@dataclass(frozen=True)
class Proposal:
    """One decision of a policy, before the risk gates."""

    action: int
    slot_id: str = ""
    blueprint_id: str = ""
    blend_mode: int = pb.BLEND_MODE_CONVEX
    alpha_ramp_steps: int = ALPHA_RAMP_STEPS[1]
    lr_factor: float = 1.0
    reason: str = ""
    # Learning signal for Simic: behaviour log-probability and value estimate. A policy that does not
    # sample (the heuristic) reports log_prob 0 (probability one) and value 0.
    log_prob: float = 0.0
    value: float = 0.0
    head_choices: dict[str, int] = field(default_factory=dict)
    head_log_probs: dict[str, float] = field(default_factory=dict)


class Policy(Protocol):
    """A decision rule Tamiyo can run: packet in, proposal out."""

    @property
    def version(self) -> str:
        """Identifies the policy's weights (recorded with every decision and field report)."""
        ...

    def propose(self, packet: pb.SystemStatePacket) -> Proposal:
        """Decide what to do for this packet."""
        ...
