"""Test doubles for the supervisor: processes that exit when told, a launcher that records them."""

from __future__ import annotations

import signal

from esper.leyline import ManualClock
from esper.weatherlight import ServiceSpec


class FakeProcess:
    """A child that exits when `crash()` is called or on a signal it does not ignore."""

    def __init__(self, pid: int, *, ignores_sigterm: bool = False, exit_at_once: int | None = None) -> None:
        self.pid = pid
        self.returncode: int | None = exit_at_once
        self.signals: list[int] = []
        self.ignores_sigterm = ignores_sigterm

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, signum: int) -> None:
        self.signals.append(signum)
        if self.returncode is not None:
            return
        if signum == signal.SIGKILL or not self.ignores_sigterm:
            self.returncode = -signum

    def wait(self) -> int:
        assert self.returncode is not None, "wait() on a child that would never exit"
        return self.returncode

    def crash(self, code: int = 1) -> None:
        self.returncode = code


class FakeLauncher:
    """Starts `FakeProcess`es with pids 1000, 1001, ...; `failures` launches raise OSError first."""

    def __init__(self, *, ignores_sigterm: bool = False, exit_at_once: int | None = None) -> None:
        self.processes: list[FakeProcess] = []
        self.launched: list[str] = []
        self.failures = 0
        self._ignores_sigterm = ignores_sigterm
        self._exit_at_once = exit_at_once

    def __call__(self, spec: ServiceSpec) -> FakeProcess:
        if self.failures:
            self.failures -= 1
            raise FileNotFoundError(f"no such program: {spec.argv[0]}")
        process = FakeProcess(
            1000 + len(self.processes), ignores_sigterm=self._ignores_sigterm, exit_at_once=self._exit_at_once
        )
        self.processes.append(process)
        self.launched.append(spec.name)
        return process


class FakeSleep:
    """Sleeps by moving a `ManualClock`; records every wait."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.clock.advance(seconds)
