"""How a seed's output is mixed into the host's activation: CONVEX, RESIDUAL, CHANNEL and CONFIDENCE.

Seed modules (Urza blueprints) map an activation to a residual of the same shape. Every mode is the
identity at alpha 0, so the counterfactual "alpha forced to 0" is exactly the host without the seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from esper.leyline import EsperError, pb

# Per-channel gates start almost open (sigmoid(4) ~ 0.98) so CHANNEL ramps like RESIDUAL at first; a
# command's `channel_alpha_init` (TAMIYO_BLEND_CHANNEL_ALPHA_INIT) sets another start.
DEFAULT_CHANNEL_ALPHA_INIT = 1.0 / (1.0 + math.exp(-4.0))


class InvalidBlendParameters(EsperError):
    """Blend parameters of a command are out of range."""

    def __init__(self, name: str, value: float, reason: str) -> None:
        self.name = name
        self.value = value
        self.reason = reason
        super().__init__(f"blend parameter {name}={value}: {reason}")


@dataclass(frozen=True)
class ConfidenceGate:
    """CONFIDENCE mode: alpha scaled per sample by `lo + (hi - lo) * sigmoid(k * (confidence - tau))`."""

    k: float = 10.0
    tau: float = 0.5
    alpha_lo: float = 0.0
    alpha_hi: float = 1.0

    @classmethod
    def from_parameters(cls, parameters: dict[str, float]) -> ConfidenceGate:
        """Read `gate_k`, `gate_tau`, `alpha_lo`, `alpha_hi` from a command; missing keys keep defaults."""
        known = {"gate_k", "gate_tau", "alpha_lo", "alpha_hi"}
        for name, value in parameters.items():
            if name not in known:
                raise InvalidBlendParameters(name, value, f"unknown; expected one of {sorted(known)}")
            if not math.isfinite(value):
                raise InvalidBlendParameters(name, value, "must be finite")
        gate = cls(
            k=parameters.get("gate_k", cls.k),
            tau=parameters.get("gate_tau", cls.tau),
            alpha_lo=parameters.get("alpha_lo", cls.alpha_lo),
            alpha_hi=parameters.get("alpha_hi", cls.alpha_hi),
        )
        if gate.k <= 0:
            raise InvalidBlendParameters("gate_k", gate.k, "must be > 0")
        if not 0.0 <= gate.tau <= 1.0:
            raise InvalidBlendParameters("gate_tau", gate.tau, "must be in [0, 1]")
        if not 0.0 <= gate.alpha_lo <= gate.alpha_hi <= 1.0:
            raise InvalidBlendParameters("alpha_lo", gate.alpha_lo, "need 0 <= alpha_lo <= alpha_hi <= 1")
        return gate


def _channel_shape(like: Tensor) -> tuple[int, ...]:
    # [N, C] for MLP activations, [N, C, H, W] for conv activations: broadcast a per-channel vector.
    return (1, like.shape[1]) + (1,) * (like.dim() - 2)


class Blender(nn.Module):
    """Mixes the host activation `x` and the seed residual `s` with weight `alpha` in one blend mode."""

    def __init__(
        self,
        mode: int,
        width: int,
        confidence: ConfidenceGate | None = None,
        *,
        channel_alpha_init: float = DEFAULT_CHANNEL_ALPHA_INIT,
    ) -> None:
        super().__init__()
        if not (math.isfinite(channel_alpha_init) and 0.0 < channel_alpha_init < 1.0):
            raise InvalidBlendParameters("channel_alpha_init", channel_alpha_init, "must be in (0, 1)")
        if mode not in (
            pb.BLEND_MODE_CONVEX,
            pb.BLEND_MODE_RESIDUAL,
            pb.BLEND_MODE_CHANNEL,
            pb.BLEND_MODE_CONFIDENCE,
        ):
            raise InvalidBlendParameters("blend_mode", float(mode), "unknown blend mode")
        self.mode = mode
        self.confidence = confidence or ConfidenceGate()
        self.channel_logits: nn.Parameter | None = None
        if mode == pb.BLEND_MODE_CHANNEL:
            logit = math.log(channel_alpha_init / (1.0 - channel_alpha_init))
            self.channel_logits = nn.Parameter(torch.full((width,), logit))

    def forward(self, x: Tensor, seed_input: Tensor, s: Tensor, alpha: float) -> Tensor:
        """The blended activation; `seed_input` is what the seed saw (`x` detached until fossilised)."""
        if self.mode == pb.BLEND_MODE_CONVEX:
            # Hands the path over: the host path weighs 1 - alpha, the seed's candidate (input + residual)
            # weighs alpha. Same value as RESIDUAL, but the host's own gradient fades with alpha.
            return (1.0 - alpha) * x + alpha * (seed_input + s)
        if self.mode == pb.BLEND_MODE_RESIDUAL:
            return x + alpha * s
        if self.mode == pb.BLEND_MODE_CHANNEL:
            assert self.channel_logits is not None
            gates = torch.sigmoid(self.channel_logits).reshape(_channel_shape(s))
            return x + (alpha * gates) * s
        return x + self.confidence_alpha(s, alpha) * s

    def confidence_alpha(self, s: Tensor, alpha: float) -> Tensor:
        """Per-sample alpha of CONFIDENCE mode, shaped to broadcast over `s`."""
        pooled = s.flatten(2).mean(dim=2) if s.dim() > 2 else s
        confidence = torch.softmax(pooled, dim=1).amax(dim=1)
        gate = self.confidence
        scale = gate.alpha_lo + (gate.alpha_hi - gate.alpha_lo) * torch.sigmoid(
            gate.k * (confidence - gate.tau)
        )
        return (alpha * scale).reshape((s.shape[0],) + (1,) * (s.dim() - 1))
