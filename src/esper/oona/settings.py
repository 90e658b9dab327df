"""Oona's settings, resolved once (prefix `OONA_`) and passed to the backend."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from esper.leyline import Backoff
from esper.leyline.settings import DAY_S, HOUR_S, MAX_BACKOFF_MULTIPLIER, MINUTE_S, StrictSettings


class OonaSettings(StrictSettings):
    """Every knob of the bus; the same for both backends unless the name says otherwise."""

    model_config = SettingsConfigDict(env_prefix="OONA_")

    max_deliveries: int = Field(
        default=5, ge=1, description="Deliveries of one message before it goes to the dead-letter stream."
    )
    maxlen: int = Field(
        default=100_000, ge=1, description="Messages kept per stream; Redis trims approximately."
    )
    reclaim_idle_ms: int = Field(
        default=30_000,
        ge=0,
        le=DAY_S * 1000,
        description="How long a message stays pending before others may reclaim it.",
    )
    max_payload_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024, description="Largest serialised envelope accepted by publish."
    )
    retry_base_ms: float = Field(
        default=50.0, gt=0, le=MINUTE_S * 1000, description="First wait after a failed Redis call."
    )
    retry_multiplier: float = Field(default=2.0, ge=1.0, le=MAX_BACKOFF_MULTIPLIER)
    retry_max_ms: float = Field(default=2_000.0, gt=0, le=HOUR_S * 1000)
    retry_jitter: float = Field(default=0.2, ge=0.0, lt=1.0)
    retry_limit: int = Field(default=6, ge=0, description="Retries before BusUnavailable is raised.")
    socket_timeout_s: float = Field(
        default=5.0, gt=0, le=HOUR_S, description="Redis connect and read timeout."
    )
    poll_interval_ms: float = Field(
        default=5.0,
        gt=0,
        le=MINUTE_S * 1000,
        description="Embedded backend: sleep between polls of a blocking consume.",
    )
    busy_timeout_ms: int = Field(
        default=10_000,
        ge=0,
        le=HOUR_S * 1000,
        description="Embedded backend: wait for another process's write lock.",
    )
    emergency_poll_ms: int = Field(
        default=50,
        ge=1,
        le=MINUTE_S * 1000,
        description="How long an emergency listener's thread blocks per poll.",
    )

    def backoff(self) -> Backoff:
        """The retry schedule for calls to an unreachable backend."""
        return Backoff(
            base_ms=self.retry_base_ms,
            multiplier=self.retry_multiplier,
            max_ms=self.retry_max_ms,
            jitter=self.retry_jitter,
            max_retries=self.retry_limit,
        )
