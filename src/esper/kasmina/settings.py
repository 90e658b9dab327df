"""Kasmina's settings, resolved once (prefix `KASMINA_`) and passed to the seed manager."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from esper.leyline.settings import HOUR_S, MAX_CLOCK_SKEW_S, StrictSettings


class KasminaSettings(StrictSettings):
    """Dwell times, gate thresholds and verification windows of the seed lifecycle (in training steps)."""

    model_config = SettingsConfigDict(env_prefix="KASMINA_")

    # G1: a seed trains in isolation for at least this many steps and must show improvement.
    min_training_steps: int = Field(default=30, ge=2, description="Minimum dwell in TRAINING.")
    improvement_window: int = Field(
        default=5, ge=1, description="Steps averaged at the start and end of TRAINING to judge improvement."
    )
    # Alpha ramp of BLENDING when a command does not name one.
    default_alpha_ramp_steps: int = Field(default=16, ge=1)
    max_alpha_ramp_steps: int = Field(default=10_000, ge=1)
    # G2: gradient health over the ramp.
    max_gradient_norm: float = Field(
        default=1e3, gt=0, description="A seed gradient above this is unhealthy."
    )
    # G3 and G4: contribution measured by the trainer's counterfactual evaluation.
    min_shadowing_steps: int = Field(default=10, ge=1, description="Minimum dwell in SHADOWING.")
    probation_steps: int = Field(default=30, ge=1, description="Window held in PROBATIONARY before G4.")
    min_contribution_loss: float = Field(
        default=0.0, description="G3/G4 need validation loss without the seed minus with it above this."
    )
    contribution_accuracy_tolerance: float = Field(
        default=0.01, ge=0, le=1.0, description="G3/G4 fail when removing the seed raises accuracy by more."
    )
    # Growth (WIDEN with gradmax init): training steps of gradient statistics gathered while GERMINATED.
    growth_statistics_steps: int = Field(
        default=8, ge=1, le=10_000, description="Backward passes a gradmax widen gathers before it builds."
    )
    # Stack: a fossilised seed becomes part of the host at the next step and its slot is free again.
    stack_fossils: bool = Field(
        default=True, description="Stack fossils into the host so a slot can host seed after seed."
    )
    # Growth lifecycles (WIDEN, DEEPEN) dwell this long in TRAINING and PROBATIONARY: their units start
    # as a function-preserving part of a layer, and a grown model pays only if it reaches its size early.
    growth_min_training_steps: int | None = Field(
        default=None,
        ge=2,
        le=100_000,
        description="Minimum dwell of a widen or deepen in TRAINING (unset: min_training_steps).",
    )
    growth_probation_steps: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description="Window a widen or deepen holds in PROBATIONARY before G4 (unset: probation_steps).",
    )
    # Cull -> embargo -> reset.
    embargo_steps: int = Field(default=40, ge=1, description="Cooldown of a slot after a cull.")
    # Command verification.
    command_freshness_s: float = Field(default=60.0, gt=0, le=HOUR_S)
    clock_skew_s: float = Field(default=5.0, ge=0, le=MAX_CLOCK_SKEW_S)
