"""`RunSummary`: the figures of a run that ended, as the assembly's `train` returns them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from esper.tolaria.emergency import HaltRequest


@dataclass(frozen=True)
class RunSummary:
    """What a run reached; `summary.json` is `to_json()` of it.

    Built from what the trainer counted as it went (the lifecycle transitions included), never by
    reading back the logs this process wrote."""

    run_id: str
    task: str
    host: str
    policy: str
    epochs: int
    steps: int
    final_val_accuracy: float
    final_val_loss: float
    best_val_accuracy: float
    params_initial: int
    params_final: int
    max_params: int | None
    seeds_fossilized: int  # seeds and growths (widen, deepen) alike: they share one lifecycle
    rollbacks: int
    decisions: int
    decision_deadline_misses: int
    resumed_from_step: int | None
    wall_seconds: float
    status: Literal["completed", "halted"]
    halt: HaltRequest | None
    transitions: dict[str, int] = field(default_factory=dict)
    # Accuracy and size before and after each growth (widen, deepen, seed), as the trainer gathered them.
    growth_steps: list[dict[str, Any]] = field(default_factory=list)

    @property
    def seeds_germinated(self) -> int:
        """Seeds that reached GERMINATED."""
        return self.transitions.get("GERMINATED", 0)

    @property
    def seeds_culled(self) -> int:
        """Seeds that were culled."""
        return self.transitions.get("CULLED", 0)

    def to_json(self) -> dict[str, Any]:
        """The document of summary.json."""
        document = asdict(self)
        document["halt"] = None if self.halt is None else asdict(self.halt)
        document["transitions"] = dict(sorted(self.transitions.items()))
        document["seeds_germinated"] = self.seeds_germinated
        document["seeds_culled"] = self.seeds_culled
        return document
