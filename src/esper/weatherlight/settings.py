"""Weatherlight's settings, resolved once (prefix `WEATHERLIGHT_`) and passed to the supervisor."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from esper.leyline import Backoff, EsperSettings
from esper.leyline.settings import DAY_S, HOUR_S, MAX_BACKOFF_MULTIPLIER, MINUTE_S, StrictSettings
from esper.weatherlight.services import SERVICES, ServiceSpec, actor_services


class WeatherlightSettings(StrictSettings):
    """Which services a node runs, how crashed ones are restarted, and where health is written."""

    model_config = SettingsConfigDict(env_prefix="WEATHERLIGHT_")

    services: Annotated[tuple[str, ...], NoDecode] = Field(
        default=("simic",),
        description=f"Services to run, comma-separated; known: {', '.join(sorted(SERVICES))}.",
    )
    actors: int = Field(
        default=0,
        ge=0,
        le=1024,
        description="Simic's actors to run beside the services (actor-0 ...; `esper simic actor`).",
    )
    restart_initial_ms: float = Field(
        default=500.0, gt=0, le=HOUR_S * 1000, description="Wait before the first restart."
    )
    restart_multiplier: float = Field(
        default=2.0, ge=1.0, le=MAX_BACKOFF_MULTIPLIER, description="Growth of the wait per restart."
    )
    restart_max_ms: float = Field(
        default=30_000.0, gt=0, le=HOUR_S * 1000, description="Longest wait before a restart."
    )
    restart_jitter: float = Field(
        default=0.2, ge=0.0, lt=1.0, description="Random spread of each wait (0.2 = +/- 20 %)."
    )
    restart_limit: int = Field(
        default=5, ge=0, description="Restarts within restart_window_s before a service is given up."
    )
    restart_window_s: float = Field(
        default=300.0, gt=0, le=DAY_S, description="Crashes older than this no longer count toward the limit."
    )
    stop_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=HOUR_S,
        description="How long a service may take to exit after SIGTERM before SIGKILL.",
    )
    health_file: Path | None = Field(
        default=None, description="Health JSON [<ESPER_DATA_DIR>/weatherlight/health.json]."
    )
    poll_interval_ms: float = Field(
        default=200.0, gt=0, le=MINUTE_S * 1000, description="Time between two supervision passes."
    )

    @field_validator("services", mode="before")
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(name.strip() for name in value.split(",") if name.strip())
        return value

    @field_validator("services")
    @classmethod
    def _known_and_unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one service is needed")
        unknown = sorted(set(value) - set(SERVICES))
        if unknown:
            raise ValueError(f"unknown service(s) {', '.join(unknown)}; known: {', '.join(sorted(SERVICES))}")
        if len(set(value)) != len(value):
            raise ValueError("a service is named twice")
        return value

    @model_validator(mode="after")
    def _max_not_below_initial(self) -> WeatherlightSettings:
        if self.restart_max_ms < self.restart_initial_ms:
            raise ValueError(
                f"WEATHERLIGHT_RESTART_MAX_MS ({self.restart_max_ms}) is below "
                f"WEATHERLIGHT_RESTART_INITIAL_MS ({self.restart_initial_ms})"
            )
        return self

    def service_specs(self) -> list[ServiceSpec]:
        """Every service to supervise: the named ones, then the actors."""
        return [SERVICES[name] for name in self.services] + actor_services(self.actors)

    def backoff(self) -> Backoff:
        """The restart schedule: `restart_limit` restarts, each wait longer than the last."""
        return Backoff(
            base_ms=self.restart_initial_ms,
            multiplier=self.restart_multiplier,
            max_ms=self.restart_max_ms,
            jitter=self.restart_jitter,
            max_retries=self.restart_limit,
        )

    def health_path(self, esper_settings: EsperSettings) -> Path:
        """Where the health file lives: `health_file`, else under the deployment's data directory."""
        return self.health_file or esper_settings.data_dir / "weatherlight" / "health.json"
