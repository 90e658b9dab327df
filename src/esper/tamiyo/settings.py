"""Tamiyo's settings, resolved once (prefix `TAMIYO_`) and passed to every component."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from esper.leyline.settings import StrictSettings


class TamiyoSettings(StrictSettings):
    """Every knob of Tamiyo. Defaults follow the brief (P1, P2, P8, P9)."""

    model_config = SettingsConfigDict(env_prefix="TAMIYO_")

    # P1: the hard budget of one `evaluate_step`.
    step_timeout_ms: float = Field(default=5.0, gt=0, description="Deadline of one decision.")
    metadata_timeout_ms: float = Field(default=20.0, gt=0, description="Deadline of a catalogue fetch.")
    # P2: compilation of the GNN.
    enable_compile: bool = Field(default=False, description="torch.compile the GNN (with warm-up).")
    device: str = Field(default="cpu", pattern=r"^(cpu|cuda(:\d+)?)$")
    cpu_threads: int = Field(default=1, ge=1, le=256, description="torch threads of the inference worker.")
    policy: Literal["heuristic", "gnn"] = Field(default="heuristic")
    # P8: blend-mode annotations on seed commands.
    enable_blend_mode_ann: bool = Field(default=True)
    # Graph builder.
    strict_graph: bool = Field(default=False, description="Raise on a missing feature instead of masking.")
    max_layers: int = Field(default=128, ge=1)
    max_seeds: int = Field(default=32, ge=1)
    max_blueprints: int = Field(default=16, ge=1)
    # P9: field-report lifecycle.
    fr_obs_window_epochs: int = Field(default=1, ge=1, description="Decisions per observation window.")
    fr_retry_backoff_ms: float = Field(default=1000.0, gt=0)
    fr_retry_backoff_mult: float = Field(default=2.0, ge=1.0)
    fr_retry_jitter: float = Field(default=0.1, ge=0.0, lt=1.0)
    fr_retry_limit: int = Field(default=8, ge=0)
    retention_days: float = Field(default=30.0, gt=0)
    # P3: policy-update intake.
    update_freshness_s: float = Field(default=3600.0, gt=0)
