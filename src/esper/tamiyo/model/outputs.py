"""What the policy network returns, and the checkpoint hook its three paths call between layers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class GNNOutput:
    """Raw head outputs for a batch of B graphs (slot/blueprint/layer scores are per node)."""

    action_logits: Tensor  # [B, len(ACTIONS)]
    slot_scores: Tensor  # [S]
    blueprint_scores: Tensor  # [P]
    blend_logits: Tensor  # [B, len(BLEND_MODES)]
    schedule_logits: Tensor  # [B, len(ALPHA_RAMP_STEPS)]
    lr_logits: Tensor  # [B, len(LR_FACTORS)]
    value: Tensor  # [B]
    layer_scores: Tensor  # [L]: the WIDEN / DEEPEN target pointer
    amount_logits: Tensor  # [B, len(WIDEN_UNITS)]


Checkpoint = Callable[[], None]


def no_checkpoint() -> None:
    return None
