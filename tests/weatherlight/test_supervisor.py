"""The supervisor restarts crashed services with growing waits, gives up on one that keeps crashing,
stops children with SIGTERM then SIGKILL, obeys emergency HALTs, and keeps the health file current.

Processes, clock and sleep are fakes: no test here starts a process or waits for real.
"""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path
from typing import Any

import pytest

from esper.leyline import ManualClock, load_settings, pb
from esper.oona import EmbeddedBus, Streams, open_envelope
from esper.tolaria.emergency import ChannelTrouble, HaltRequest
from esper.weatherlight import ServiceSpec, Supervisor, WeatherlightSettings
from esper.weatherlight.events import BusEventPublisher, SupervisorEvent
from esper.weatherlight.health import read_health
from esper.weatherlight.supervisor import describe_exit, stop_on_signals
from tests.conftest import fast_oona_settings
from tests.weatherlight.fakes import FakeLauncher, FakeSleep

SERVICE = ServiceSpec("learner", ("learner",), "a fake service")
OTHER = ServiceSpec("other", ("other",), "another fake service")


def settings(**overrides: Any) -> WeatherlightSettings:
    defaults: dict[str, Any] = {
        "restart_initial_ms": 100.0,
        "restart_multiplier": 2.0,
        "restart_max_ms": 1_000.0,
        "restart_jitter": 0.0,
        "restart_limit": 10,
        "restart_window_s": 300.0,
        "stop_timeout_s": 2.0,
        "poll_interval_ms": 50.0,
    }
    return load_settings(WeatherlightSettings, environ={}, **(defaults | overrides))


class Rig:
    """A supervisor over fakes, with the events it emitted."""

    def __init__(
        self, tmp_path: Path, *services: ServiceSpec, launcher: FakeLauncher | None = None, **knobs: Any
    ):
        self.clock = ManualClock()
        self.sleep = FakeSleep(self.clock)
        self.launcher = launcher or FakeLauncher()
        self.events: list[SupervisorEvent] = []
        self.health_path = tmp_path / "weatherlight" / "health.json"
        self.emergency = knobs.pop("emergency", None)
        self.supervisor = Supervisor(
            services or (SERVICE,),
            settings(**knobs),
            self.health_path,
            launcher=self.launcher,
            clock=self.clock,
            sleep=self.sleep,
            rng=random.Random(7),
            sinks=[self.events.append],
            emergency=self.emergency,
        )

    def names(self) -> list[str]:
        return [event.name for event in self.events]

    def delays(self) -> list[float]:
        return [float(e.attributes["delay_s"]) for e in self.events if e.name == "service_restart_scheduled"]

    def health(self) -> dict[str, Any]:
        return {s["name"]: s for s in read_health(self.health_path)["services"]}

    def crash_and_restart(self, code: int = 1) -> None:
        """Crash the newest process and move time until the supervisor has started the next one."""
        before = len(self.launcher.processes)
        self.launcher.processes[-1].crash(code)
        self.supervisor.step()
        while len(self.launcher.processes) == before:
            self.clock.advance(0.01)
            self.supervisor.step()


def test_a_crashed_service_is_restarted_after_waits_that_grow_up_to_the_cap(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.supervisor.start()
    for _ in range(6):
        rig.crash_and_restart()
    assert rig.delays() == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert len(rig.launcher.processes) == 7
    assert rig.health()["learner"]["restarts"] == 6
    assert rig.health()["learner"]["state"] == "running"


def test_a_restart_is_not_made_before_its_wait_is_over(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.supervisor.start()
    rig.launcher.processes[0].crash(3)
    rig.supervisor.step()
    assert rig.health()["learner"]["state"] == "restarting"
    rig.clock.advance(0.09)
    rig.supervisor.step()
    assert len(rig.launcher.processes) == 1
    rig.clock.advance(0.011)
    rig.supervisor.step()
    assert len(rig.launcher.processes) == 2


def test_jitter_spreads_the_waits_within_its_bounds(tmp_path: Path) -> None:
    rig = Rig(tmp_path, restart_jitter=0.5, restart_max_ms=100_000.0)
    rig.supervisor.start()
    for _ in range(5):
        rig.crash_and_restart()
    delays = rig.delays()
    for attempt, delay in enumerate(delays):
        nominal = 0.1 * 2**attempt
        assert 0.5 * nominal <= delay <= 1.5 * nominal
    assert any(abs(delay - 0.1 * 2**i) > 1e-3 for i, delay in enumerate(delays))


def test_a_service_that_keeps_crashing_is_given_up_and_that_is_announced(tmp_path: Path) -> None:
    rig = Rig(tmp_path, launcher=FakeLauncher(exit_at_once=2), restart_limit=3)
    outcome = rig.supervisor.run()
    assert outcome.given_up == ("learner",)
    assert outcome.reason == "no service left to run" and not outcome.halted
    assert len(rig.launcher.processes) == 4  # the first start and three restarts
    (given_up,) = [e for e in rig.events if e.name == "service_given_up"]
    assert given_up.service == "learner"
    assert "limit 3" in given_up.reason and "exited with status 2" in given_up.reason
    assert given_up.level == pb.TELEMETRY_LEVEL_ERROR
    health = rig.health()["learner"]
    assert health["state"] == "given_up" and health["last_exit_code"] == 2 and health["pid"] is None
    assert rig.names().count("service_exited") == 4


def test_a_limit_of_zero_gives_up_at_the_first_crash(tmp_path: Path) -> None:
    rig = Rig(tmp_path, restart_limit=0)
    rig.supervisor.start()
    rig.launcher.processes[0].crash()
    rig.supervisor.step()
    assert rig.health()["learner"]["state"] == "given_up"
    assert "service_restart_scheduled" not in rig.names()


def test_crashes_older_than_the_window_do_not_count_toward_the_limit(tmp_path: Path) -> None:
    rig = Rig(tmp_path, restart_limit=1, restart_window_s=10.0)
    rig.supervisor.start()
    rig.crash_and_restart()
    rig.clock.advance(11.0)  # ran well for longer than the window
    rig.crash_and_restart()
    assert rig.delays() == pytest.approx([0.1, 0.1])  # the wait starts over too
    rig.launcher.processes[-1].crash()
    rig.supervisor.step()
    assert rig.health()["learner"]["state"] == "given_up"


def test_a_service_that_finishes_cleanly_is_not_restarted(tmp_path: Path) -> None:
    rig = Rig(tmp_path, launcher=FakeLauncher(exit_at_once=0))
    outcome = rig.supervisor.run()
    assert len(rig.launcher.processes) == 1
    assert outcome.given_up == () and outcome.reason == "no service left to run"
    health = rig.health()["learner"]
    assert health["state"] == "stopped" and health["last_exit_code"] == 0
    assert "not restarted" in health["reason"]
    # Done is not a fault: announced at INFO, not as a crash's exit.
    assert "service_finished" in rig.names() and "service_exited" not in rig.names()


def test_a_service_that_cannot_be_launched_is_retried_like_a_crash(tmp_path: Path) -> None:
    launcher = FakeLauncher()
    launcher.failures = 1
    rig = Rig(tmp_path, launcher=launcher)
    rig.supervisor.start()
    (failed,) = [e for e in rig.events if e.name == "service_start_failed"]
    assert "no such program" in failed.reason
    assert rig.health()["learner"]["state"] == "restarting"
    rig.clock.advance(0.1)
    rig.supervisor.step()
    assert rig.health()["learner"]["state"] == "running" and len(launcher.processes) == 1


def test_stop_sends_sigterm_and_the_service_exits(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.supervisor.start()
    rig.supervisor.stop("operator")
    (process,) = rig.launcher.processes
    assert process.signals == [signal.SIGTERM]
    assert rig.sleep.waits == []  # it exited at once: no waiting for the timeout
    health = rig.health()["learner"]
    assert health["state"] == "stopped" and health["last_exit_code"] == -signal.SIGTERM
    assert read_health(rig.health_path)["supervisor"]["state"] == "stopped"
    assert rig.names()[-1] == "supervisor_stopped"


def test_stop_sends_sigkill_after_the_timeout_to_a_service_that_ignores_sigterm(tmp_path: Path) -> None:
    rig = Rig(tmp_path, launcher=FakeLauncher(ignores_sigterm=True), stop_timeout_s=2.0)
    rig.supervisor.start()
    started = rig.clock.monotonic()
    rig.supervisor.stop("operator")
    (process,) = rig.launcher.processes
    assert process.signals == [signal.SIGTERM, signal.SIGKILL]
    assert rig.clock.monotonic() - started == pytest.approx(2.0)
    (killed,) = [e for e in rig.events if e.name == "service_killed"]
    assert "2 s after SIGTERM" in killed.reason
    assert rig.health()["learner"]["last_exit_code"] == -signal.SIGKILL


def test_stop_cancels_a_pending_restart_and_is_idempotent(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.supervisor.start()
    rig.launcher.processes[0].crash()
    rig.supervisor.step()
    rig.supervisor.stop("operator")
    rig.supervisor.stop("again")
    rig.clock.advance(10.0)
    assert len(rig.launcher.processes) == 1
    assert rig.health()["learner"]["state"] == "stopped"
    assert rig.names().count("supervisor_stopped") == 1


def test_run_stops_every_child_when_supervision_raises(tmp_path: Path) -> None:
    rig = Rig(tmp_path, SERVICE, OTHER)

    def broken_sleep(seconds: float) -> None:
        raise RuntimeError("a bug in the loop")

    rig.supervisor._sleep = broken_sleep  # the sleep between passes is the first thing run() calls
    with pytest.raises(RuntimeError, match="a bug"):
        rig.supervisor.run()
    assert [p.signals for p in rig.launcher.processes] == [[signal.SIGTERM], [signal.SIGTERM]]
    assert {s["state"] for s in rig.health().values()} == {"stopped"}


class ScriptedChannel:
    """An emergency channel that answers from a script, then None."""

    def __init__(self, *answers: HaltRequest | ChannelTrouble | None) -> None:
        self.answers = list(answers)

    def poll_halt(self) -> HaltRequest | ChannelTrouble | None:
        return self.answers.pop(0) if self.answers else None

    def broadcast_halt(self, reason: str) -> str:
        raise AssertionError("the supervisor never broadcasts")


def test_an_emergency_halt_stops_every_service(tmp_path: Path) -> None:
    halt = HaltRequest(reason="disk full", origin="operator", signal_id="sig-1")
    rig = Rig(tmp_path, SERVICE, OTHER, emergency=ScriptedChannel(None, halt))
    outcome = rig.supervisor.run()
    assert outcome.halted and outcome.reason == "emergency HALT from operator: disk full"
    assert [p.signals for p in rig.launcher.processes] == [[signal.SIGTERM], [signal.SIGTERM]]
    assert "emergency_halt" in rig.names()


def test_an_unreadable_emergency_channel_is_one_event_per_spell(tmp_path: Path) -> None:
    trouble = ChannelTrouble(reason="emergency stream unreadable: bus down")
    rig = Rig(tmp_path, emergency=ScriptedChannel(trouble, trouble, None, trouble))
    rig.supervisor.start()
    for _ in range(4):
        rig.supervisor.step()
    assert rig.names().count("emergency_channel_unreadable") == 2
    assert rig.health()["learner"]["state"] == "running"


def test_sigterm_asks_the_supervisor_to_stop(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals(rig.supervisor):
        os.kill(os.getpid(), signal.SIGTERM)
        outcome = rig.supervisor.run()
    assert outcome.reason == "SIGTERM received"
    assert signal.getsignal(signal.SIGTERM) is before


def test_health_file_holds_every_field_and_is_replaced_atomically(tmp_path: Path) -> None:
    rig = Rig(tmp_path, SERVICE, OTHER)
    rig.supervisor.start()
    rig.launcher.processes[0].crash(7)
    rig.supervisor.step()
    document = read_health(rig.health_path)
    assert document["supervisor"]["pid"] == os.getpid()
    assert document["supervisor"]["state"] == "running"
    learner, other = document["services"]
    assert learner["name"] == "learner" and learner["state"] == "restarting"
    assert learner["pid"] is None and learner["last_exit_code"] == 7 and learner["restarts"] == 0
    assert learner["next_start_at"] and learner["last_change"].endswith("+00:00")
    assert "exited with status 7" in learner["reason"]
    assert other["state"] == "running" and other["pid"] == 1001 and other["last_exit_code"] is None
    assert os.listdir(rig.health_path.parent) == ["health.json"]  # no temporary file left behind
    json.loads(rig.health_path.read_text())


def test_every_event_has_a_reason(tmp_path: Path) -> None:
    rig = Rig(tmp_path, launcher=FakeLauncher(exit_at_once=1), restart_limit=1)
    rig.supervisor.run()
    assert rig.names() == [
        "supervisor_started",
        "service_started",
        "service_exited",
        "service_restart_scheduled",
        "service_started",
        "service_exited",
        "service_given_up",
        "supervisor_stopping",
        "supervisor_stopped",
    ]
    assert all(event.reason for event in rig.events)


def test_describe_exit_names_the_signal() -> None:
    assert describe_exit(1) == "exited with status 1"
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"


def test_events_are_published_as_telemetry_and_a_give_up_is_urgent(tmp_path: Path) -> None:
    bus = EmbeddedBus(tmp_path / "bus.sqlite3", fast_oona_settings())
    try:
        for stream in (Streams.TELEMETRY, Streams.EMERGENCY):
            bus.ensure_group(stream, "test")
        rig = Rig(tmp_path, launcher=FakeLauncher(exit_at_once=1), restart_limit=0)
        rig.supervisor._sinks.append(BusEventPublisher(bus, clock=rig.clock))
        rig.supervisor.run()
        routine = [
            open_envelope(d.envelope, pb.TelemetryPacket)
            for d in bus.consume(Streams.TELEMETRY, "test", "t", count=100)
        ]
        urgent = [
            open_envelope(d.envelope, pb.TelemetryPacket)
            for d in bus.consume(Streams.EMERGENCY, "test", "t", count=100)
        ]
    finally:
        bus.close()
    assert [p.events[0].name for p in urgent] == ["service_given_up"]
    assert urgent[0].source_subsystem == "weatherlight"
    assert urgent[0].events[0].attributes["service"] == "learner"
    assert "service_started" in [p.events[0].name for p in routine]
