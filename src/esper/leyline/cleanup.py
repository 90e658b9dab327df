"""Clean-up that never hides the error that ended the work.

A `finally` that closes several things has two faults: the first close that raises skips the others, and
its exception replaces the one that ended the work, so the operator reads "delete group ... failed" instead
of the reason the run stopped. `CleanupStack` runs every step, reports each failure beside the original
error (to its `on_failure` callback, and as a note on that error), and raises `CleanupFailed` only when
the work itself succeeded: a clean-up failure is never silent, and never takes another error's place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType

from esper.leyline.errors import EsperError

CleanupReporter = Callable[[str, Exception], None]
"""Told of each failed step: its name and error (log it, record an event). It must not raise."""


class CleanupFailed(EsperError):
    """The work succeeded but clean-up steps failed; `failures` holds each step's name and error."""

    def __init__(self, failures: Sequence[tuple[str, Exception]]) -> None:
        self.failures = tuple(failures)
        super().__init__("; ".join(f"{name}: {describe(exc)}" for name, exc in self.failures))


def describe(exc: BaseException) -> str:
    """`TypeName: message`, the way clean-up failures are reported."""
    return f"{type(exc).__name__}: {exc}"


class CleanupStack:
    """Named clean-up steps, run last-in first-out when the `with` block ends (or at `close`).

    Every step runs whatever the others do. A step that raises is reported to `on_failure`; if the block
    is ending on an exception, that exception propagates unchanged (with a note naming the failed step),
    otherwise `CleanupFailed` is raised once every step has run.
    """

    def __init__(self, on_failure: CleanupReporter) -> None:
        self._on_failure = on_failure
        self._steps: list[tuple[str, Callable[[], object]]] = []

    def push(self, name: str, step: Callable[[], object]) -> None:
        """Run `step` at the end, before every step pushed earlier; `name` says what it does."""
        self._steps.append((name, step))

    def close(self, pending: BaseException | None = None) -> list[tuple[str, Exception]]:
        """Run and forget every step; return the failures (already reported, and noted on `pending`)."""
        failures: list[tuple[str, Exception]] = []
        while self._steps:
            name, step = self._steps.pop()
            try:
                step()
            except Exception as exc:  # noqa: BLE001 (any failure of a step is reported, and the next runs)
                failures.append((name, exc))
                self._on_failure(name, exc)
                if pending is not None:
                    pending.add_note(f"clean-up step {name!r} also failed: {describe(exc)}")
        return failures

    def __enter__(self) -> CleanupStack:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        failures = self.close(exc)
        if exc is None and failures:
            raise CleanupFailed(failures)
