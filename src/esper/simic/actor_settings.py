"""What Simic's actors draw their episodes from (`ActorSettings`, prefix `ACTOR_`), without PyTorch: the
actors themselves build runs, so they live in the run assembly (`esper.assembly.actor`)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from esper.leyline.settings import StrictSettings

# Each family: the bundled task and the host that takes it.
FAMILIES: dict[str, tuple[str, str]] = {
    "generated": ("generated", "mlp"),
    "signals": ("signals", "conv1d"),
    "digits": ("digits", "cnn"),
    "tokens": ("tokens", "transformer"),
}


class ActorSettings(StrictSettings):
    """What an actor's episodes are: their length and the distribution their tasks are drawn from."""

    model_config = SettingsConfigDict(env_prefix="ACTOR_")

    epochs: int = Field(default=6, ge=1, le=10_000, description="Passes over the training split per episode.")
    decision_interval: int = Field(default=10, ge=1, description="Training steps between decisions.")
    families: Annotated[tuple[str, ...], NoDecode] = Field(
        default=tuple(FAMILIES),
        description=f"Task families episodes are drawn from, comma-separated; known: {', '.join(FAMILIES)}.",
    )
    difficulty_min: float = Field(default=0.2, ge=0.0, le=1.0, description="Easiest task difficulty drawn.")
    difficulty_max: float = Field(default=0.8, ge=0.0, le=1.0, description="Hardest task difficulty drawn.")
    budget_min: float = Field(
        default=1.5,
        ge=0.0,
        le=1000.0,
        description="Smallest growth budget drawn, as a multiple of the host's starting parameters "
        "(0 with budget_max 0: unbounded).",
    )
    budget_max: float = Field(
        default=4.0, ge=0.0, le=1000.0, description="Largest growth budget drawn (same unit as budget_min)."
    )
    policy: str = Field(
        default="gnn", pattern="^(gnn|heuristic)$", description="Tamiyo's policy: gnn or heuristic."
    )
    heuristic_share: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Share of episodes run under the heuristic instead (material for the imitation "
        "bootstrap); drawn per episode.",
    )
    seed: int = Field(
        default=0, ge=0, description="Seed of every episode's draw (with the actor id and index)."
    )
    max_episodes: int = Field(
        default=0, ge=0, description="Episodes an actor completes (restarts included), then exits (0: never)."
    )

    @field_validator("families", mode="before")
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(name.strip() for name in value.split(",") if name.strip())
        return value

    @field_validator("families")
    @classmethod
    def _known_families(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one family is needed")
        unknown = sorted(set(value) - set(FAMILIES))
        if unknown:
            raise ValueError(f"unknown families {', '.join(unknown)}; known: {', '.join(FAMILIES)}")
        return value

    @model_validator(mode="after")
    def _ranges_in_order(self) -> ActorSettings:
        if self.difficulty_max < self.difficulty_min:
            raise ValueError(
                f"ACTOR_DIFFICULTY_MAX ({self.difficulty_max}) is below ACTOR_DIFFICULTY_MIN "
                f"({self.difficulty_min})"
            )
        if self.budget_max < self.budget_min:
            raise ValueError(
                f"ACTOR_BUDGET_MAX ({self.budget_max}) is below ACTOR_BUDGET_MIN ({self.budget_min})"
            )
        if self.budget_max > 0 and self.budget_min < 1:
            raise ValueError(
                f"ACTOR_BUDGET_MIN ({self.budget_min}) must be at least 1 (the host itself), or 0 with "
                "ACTOR_BUDGET_MAX 0 (unbounded)"
            )
        return self
