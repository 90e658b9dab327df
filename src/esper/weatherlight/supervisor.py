"""The supervisor: runs each service as a child process, restarts crashed ones with backoff, gives up on
a service that keeps crashing, and stops every child on request, on SIGTERM/SIGINT or on an emergency HALT.

Time, sleeping and process creation are injected (`clock`, `sleep`, `launcher`), so the whole restart and
stop logic is tested without real processes or real waits. Every change of a service is an event with a
reason (see `events.EVENTS`) and a rewrite of the health file.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from esper.leyline import SYSTEM_CLOCK, Clock
from esper.tolaria.emergency import ChannelTrouble, EmergencyChannel, HaltRequest
from esper.weatherlight.events import SupervisorEvent, SupervisorEventSink
from esper.weatherlight.health import ServiceHealth, ServiceState, iso_time, write_health
from esper.weatherlight.services import ServiceSpec
from esper.weatherlight.settings import WeatherlightSettings


class ChildProcess(Protocol):
    """What the supervisor needs of a running service."""

    @property
    def pid(self) -> int:
        """The child's process id."""
        ...

    def poll(self) -> int | None:
        """The exit status once the child has exited (negative: killed by that signal), else None."""
        ...

    def send_signal(self, signum: int) -> None:
        """Deliver `signum` to the child (and whatever it started)."""
        ...

    def wait(self) -> int:
        """Block until the child has exited; its exit status."""
        ...


Launcher = Callable[[ServiceSpec], ChildProcess]


class ServiceProcess:
    """A service started with `subprocess.Popen` in a session of its own.

    Its own session keeps a terminal's Ctrl-C away from it (the supervisor decides the order of the
    stop), and signals go to its whole process group. Once it has exited, whatever it left running in
    its group is killed, so nothing it started outlives it (a crash included).
    """

    def __init__(self, spec: ServiceSpec) -> None:
        self._popen = subprocess.Popen(list(spec.argv), stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int:
        return self._popen.pid

    def poll(self) -> int | None:
        code = self._popen.poll()
        if code is not None:
            self._kill_leftovers()
        return code

    def send_signal(self, signum: int) -> None:
        if self._popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):  # exited between the poll and the signal
            os.killpg(self._popen.pid, signum)

    def wait(self) -> int:
        code = self._popen.wait()
        self._kill_leftovers()
        return code

    def _kill_leftovers(self) -> None:
        # The group outlives its leader while a member is alive, so its id is not reused meanwhile.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._popen.pid, signal.SIGKILL)


def describe_exit(code: int) -> str:
    """`exited with status 1`, `killed by SIGKILL`."""
    if code >= 0:
        return f"exited with status {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


@dataclass(frozen=True)
class SupervisionOutcome:
    """Why supervision ended, whether an emergency HALT ended it, and which services were given up."""

    reason: str
    halted: bool
    given_up: tuple[str, ...]


@dataclass
class _Service:
    spec: ServiceSpec
    state: ServiceState = ServiceState.STOPPED
    process: ChildProcess | None = None
    restarts: int = 0
    last_exit_code: int | None = None
    last_change_ns: int = 0
    reason: str = "not started"
    crashes: deque[float] = field(default_factory=deque)
    next_start: float = 0.0
    next_start_wall_ns: int | None = None


class Supervisor:
    """Runs `services` until asked to stop; see the module docstring.

    `sleep` waits between supervision passes and during a stop; by default the wait between passes ends
    early when a stop is requested. `emergency` is polled every pass: a HALT stops everything.
    """

    def __init__(
        self,
        services: Sequence[ServiceSpec],
        settings: WeatherlightSettings,
        health_path: Path,
        *,
        launcher: Launcher = ServiceProcess,
        clock: Clock = SYSTEM_CLOCK,
        sleep: Callable[[float], None] | None = None,
        rng: random.Random | None = None,
        sinks: Sequence[SupervisorEventSink] = (),
        emergency: EmergencyChannel | None = None,
    ) -> None:
        if not services:
            raise ValueError("a supervisor needs at least one service")
        names = [spec.name for spec in services]
        if len(set(names)) != len(names):
            raise ValueError(f"service names must be unique, got {names}")
        self.settings = settings
        self.health_path = health_path
        self._services = [_Service(spec) for spec in services]
        self._launcher = launcher
        self._clock = clock
        self._sleep = sleep or self._default_sleep
        self._rng = rng or random.Random()
        self._sinks = list(sinks)
        self._emergency = emergency
        self._backoff = settings.backoff()
        self._wake = threading.Event()
        self._stop_reason: str | None = None
        self._halt: HaltRequest | None = None
        self._channel_trouble = False
        self._state = "starting"
        self._stopped = False

    # -- control ------------------------------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """Ask `run()` to stop every service and return; safe from signal handlers and other threads."""
        if self._stop_reason is None:
            self._stop_reason = reason
        self._wake.set()

    def run(self) -> SupervisionOutcome:
        """Start every service, supervise until a stop is requested or none is left to run, then stop all.

        Children are stopped on every way out, an exception included.
        """
        reason = "supervisor exiting"
        try:
            self.start()
            while self._stop_reason is None:
                self.step()
                if self._stop_reason is not None:
                    break
                if not any(
                    s.state in (ServiceState.RUNNING, ServiceState.RESTARTING) for s in self._services
                ):
                    self._stop_reason = "no service left to run"
                    break
                self._sleep(self.settings.poll_interval_ms / 1000)
            reason = self._stop_reason
        finally:
            self.stop(self._stop_reason or reason)
        return SupervisionOutcome(
            reason=reason,
            halted=self._halt is not None,
            given_up=tuple(s.spec.name for s in self._services if s.state is ServiceState.GIVEN_UP),
        )

    def start(self) -> None:
        """Start every service once."""
        self._state = "running"
        names = ", ".join(s.spec.name for s in self._services)
        self._emit("supervisor_started", "", f"supervising {names}", pid=str(os.getpid()))
        for service in self._services:
            self._launch(service, "started by the supervisor")

    def step(self) -> None:
        """One supervision pass: the emergency channel, exited children, restarts that are due."""
        self._poll_emergency()
        if self._stop_reason is not None:
            return
        for service in self._services:
            if service.state is ServiceState.RUNNING and service.process is not None:
                code = service.process.poll()
                if code is not None:
                    self._exited(service, code)
            if service.state is ServiceState.RESTARTING and self._clock.monotonic() >= service.next_start:
                service.restarts += 1
                self._launch(service, f"restart {service.restarts}")

    def stop(self, reason: str) -> None:
        """SIGTERM every running service, SIGKILL those still running after `stop_timeout_s`; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._state = "stopping"
        self._emit("supervisor_stopping", "", reason)
        pending: list[_Service] = []
        for service in self._services:
            if service.process is not None:
                service.process.send_signal(signal.SIGTERM)
                self._change(service, ServiceState.STOPPING, f"SIGTERM sent: {reason}")
                self._emit("service_stopping", service.spec.name, f"SIGTERM sent: {reason}")
                pending.append(service)
            elif service.state is ServiceState.RESTARTING:
                service.next_start_wall_ns = None
                self._change(service, ServiceState.STOPPED, f"stopped before its restart: {reason}")
                self._emit("service_stopped", service.spec.name, f"restart cancelled: {reason}")
        deadline = self._clock.monotonic() + self.settings.stop_timeout_s
        while pending:
            for service in list(pending):
                assert service.process is not None
                code = service.process.poll()
                if code is not None:
                    pending.remove(service)
                    self._stopped_with(
                        service, code, "service_stopped", f"{describe_exit(code)} after SIGTERM"
                    )
            remaining = deadline - self._clock.monotonic()
            if not pending or remaining <= 0:
                break
            self._sleep(min(self.settings.poll_interval_ms / 1000, remaining))
        for service in pending:
            assert service.process is not None
            service.process.send_signal(signal.SIGKILL)
            code = service.process.wait()
            self._stopped_with(
                service,
                code,
                "service_killed",
                f"still running {self.settings.stop_timeout_s:g} s after SIGTERM: SIGKILL sent",
            )
        self._state = "stopped"
        self._write_health()
        self._emit("supervisor_stopped", "", reason)

    def health(self) -> list[ServiceHealth]:
        """The state of every service, as written to the health file."""
        return [
            ServiceHealth(
                name=s.spec.name,
                state=s.state,
                pid=s.process.pid if s.process is not None else None,
                restarts=s.restarts,
                last_exit_code=s.last_exit_code,
                last_change=iso_time(s.last_change_ns) if s.last_change_ns else "",
                reason=s.reason,
                next_start_at=iso_time(s.next_start_wall_ns) if s.next_start_wall_ns is not None else None,
            )
            for s in self._services
        ]

    # -- what happens to a service ------------------------------------------------------------------

    def _launch(self, service: _Service, why: str) -> None:
        name = service.spec.name
        try:
            service.process = self._launcher(service.spec)
        except OSError as exc:
            service.process = None
            self._emit("service_start_failed", name, f"{why} failed: {exc}")
            self._crashed(service, f"could not start: {exc}")
            return
        service.next_start_wall_ns = None
        pid = service.process.pid
        self._change(service, ServiceState.RUNNING, f"{why} (pid {pid})")
        self._emit("service_started", name, why, pid=str(pid), restarts=str(service.restarts))

    def _exited(self, service: _Service, code: int) -> None:
        assert service.process is not None
        pid = service.process.pid
        service.process = None
        service.last_exit_code = code
        name = service.spec.name
        if code == 0:
            why = "exited on its own with status 0: finished, not restarted"
            self._change(service, ServiceState.STOPPED, why)
            self._emit("service_finished", name, why, pid=str(pid), exit_code="0")
            return
        self._emit("service_exited", name, describe_exit(code), pid=str(pid), exit_code=str(code))
        self._crashed(service, describe_exit(code))

    def _crashed(self, service: _Service, what: str) -> None:
        """Restart after a jittered, growing wait, or give up once the restarts in the window are used up."""
        now = self._clock.monotonic()
        window = self.settings.restart_window_s
        while service.crashes and service.crashes[0] <= now - window:
            service.crashes.popleft()
        service.crashes.append(now)
        recent = len(service.crashes) - 1  # restarts already made within the window
        name = service.spec.name
        limit = self.settings.restart_limit
        if self._backoff.exhausted(recent):
            why = f"{what}; {recent} restart(s) within {window:g} s already (limit {limit}): given up"
            self._change(service, ServiceState.GIVEN_UP, why)
            self._emit("service_given_up", name, why, restarts=str(service.restarts))
            return
        delay_s = self._backoff.delay_ms(recent, self._rng) / 1000
        service.next_start = now + delay_s
        service.next_start_wall_ns = self._clock.wall_ns() + int(delay_s * 1e9)
        why = f"{what}; restart {recent + 1} of {limit} within {window:g} s in {delay_s:.2f} s"
        self._change(service, ServiceState.RESTARTING, why)
        self._emit("service_restart_scheduled", name, why, delay_s=f"{delay_s:.3f}")

    def _stopped_with(self, service: _Service, code: int, event: str, why: str) -> None:
        assert service.process is not None
        pid = service.process.pid
        service.process = None
        service.last_exit_code = code
        self._change(service, ServiceState.STOPPED, why)
        self._emit(event, service.spec.name, why, pid=str(pid), exit_code=str(code))

    def _poll_emergency(self) -> None:
        if self._emergency is None:
            return
        result = self._emergency.poll_halt()
        if isinstance(result, ChannelTrouble):
            if not self._channel_trouble:  # one event per spell of trouble, not one per pass
                self._emit("emergency_channel_unreadable", "", result.reason)
            self._channel_trouble = True
            return
        self._channel_trouble = False
        if isinstance(result, HaltRequest):
            self._halt = result
            why = f"emergency HALT from {result.origin}: {result.reason}"
            self._emit("emergency_halt", "", why, signal_id=result.signal_id, origin=result.origin)
            self.request_stop(why)

    # -- bookkeeping --------------------------------------------------------------------------------

    def _change(self, service: _Service, state: ServiceState, reason: str) -> None:
        service.state = state
        service.reason = reason
        service.last_change_ns = self._clock.wall_ns()
        self._write_health()

    def _write_health(self) -> None:
        write_health(
            self.health_path,
            supervisor_pid=os.getpid(),
            supervisor_state=self._state,
            updated_at=iso_time(self._clock.wall_ns()),
            services=self.health(),
        )

    def _emit(self, name: str, service: str, reason: str, **attributes: str) -> None:
        event = SupervisorEvent(name, service, reason, self._clock.wall_ns(), attributes)
        event.log()
        for sink in self._sinks:
            sink(event)

    def _default_sleep(self, seconds: float) -> None:
        # Between passes a stop request cuts the wait short; while stopping, the wait is a real one.
        if self._stop_reason is None:
            self._wake.wait(seconds)
        else:
            time.sleep(seconds)


@contextlib.contextmanager
def stop_on_signals(
    supervisor: Supervisor, signums: Sequence[int] = (signal.SIGTERM, signal.SIGINT)
) -> Iterator[None]:
    """While inside, SIGTERM and SIGINT ask `supervisor` to stop (main thread only); the previous
    handlers come back after."""

    def handler(signum: int, _frame: object) -> None:
        supervisor.request_stop(f"{signal.Signals(signum).name} received")

    previous = {signum: signal.signal(signum, handler) for signum in signums}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
