"""The one clock of Esper: wall time for timestamps, monotonic time for durations.

Components take a `Clock` so tests can drive time by hand instead of sleeping.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Source of time for a component."""

    def wall_ns(self) -> int:
        """Nanoseconds since the Unix epoch (for timestamps that cross processes)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a monotonic clock (for durations and deadlines)."""
        ...


class SystemClock:
    """The real clock."""

    def wall_ns(self) -> int:
        return time.time_ns()

    def monotonic(self) -> float:
        return time.monotonic()


class ManualClock:
    """A clock that moves only when told to; for tests and simulations."""

    def __init__(self, wall_ns: int = 1_700_000_000_000_000_000, monotonic: float = 1000.0) -> None:
        self._wall_ns = wall_ns
        self._monotonic = monotonic

    def wall_ns(self) -> int:
        return self._wall_ns

    def monotonic(self) -> float:
        return self._monotonic

    def advance(self, seconds: float) -> None:
        """Move both clocks forward by `seconds`."""
        if seconds < 0:
            raise ValueError(f"a clock cannot go back (advance by {seconds})")
        self._wall_ns += int(seconds * 1e9)
        self._monotonic += seconds


SYSTEM_CLOCK = SystemClock()
