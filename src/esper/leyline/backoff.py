"""The one retry schedule of Esper: exponential backoff with jitter and a retry limit."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: attempt n waits base * multiplier**n, capped, with +/- jitter.

    `jitter` is a fraction (0.2 = up to 20 % either way) so that many clients do not retry in step.
    """

    base_ms: float
    multiplier: float
    max_ms: float = 60_000.0
    jitter: float = 0.0
    max_retries: int = 8

    def __post_init__(self) -> None:
        if self.base_ms <= 0:
            raise ValueError(f"backoff base_ms must be > 0, got {self.base_ms}")
        if self.multiplier < 1.0:
            raise ValueError(f"backoff multiplier must be >= 1, got {self.multiplier}")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"backoff jitter must be in [0, 1), got {self.jitter}")
        if self.max_retries < 0:
            raise ValueError(f"backoff max_retries must be >= 0, got {self.max_retries}")

    def delay_ms(self, attempt: int, rng: random.Random | None = None) -> float:
        """Delay before retry number `attempt` (0-based)."""
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt}")
        raw = min(self.base_ms * self.multiplier**attempt, self.max_ms)
        if self.jitter:
            spread = (rng or random).uniform(-self.jitter, self.jitter)
            raw *= 1.0 + spread
        return raw

    def exhausted(self, attempts: int) -> bool:
        """True when `attempts` retries have used up the limit."""
        return attempts >= self.max_retries
