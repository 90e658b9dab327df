"""Nissa's settings, resolved once (prefix `NISSA_`) and passed down."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from esper.leyline.settings import StrictSettings


class NissaSettings(StrictSettings):
    """Where a process exposes its Prometheus metrics."""

    model_config = SettingsConfigDict(env_prefix="NISSA_")

    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Serve /metrics on this port while the process runs (0: any free port; unset: none).",
    )
    metrics_address: str = Field(
        default="127.0.0.1", min_length=1, description="Address the metrics server listens on."
    )
