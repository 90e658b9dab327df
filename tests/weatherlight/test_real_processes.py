"""The supervisor with real child processes: a SIGKILLed service comes back, and stopping leaves no
process behind: not one a crashed service started, nor one that ignores SIGTERM."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from esper.leyline import load_settings
from esper.weatherlight import ServiceSpec, Supervisor, WeatherlightSettings
from esper.weatherlight.health import HealthFileError, read_health

# Starts a grandchild, records both pids, then sleeps: SIGTERM (the default action) ends it.
COOPERATIVE = """
import os, subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
with open(sys.argv[1], "a") as handle:
    handle.write(f"{os.getpid()} {grandchild.pid}\\n")
time.sleep(120)
"""
STUBBORN = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
time.sleep(120)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose: it runs nothing, it only waits to be reaped by its parent.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def service_health(path: Path, name: str) -> dict[str, Any] | None:
    try:
        document = read_health(path)
    except HealthFileError:
        return None
    services: list[dict[str, Any]] = document["services"]
    return next(s for s in services if s["name"] == name)


@pytest.mark.slow
def test_a_killed_service_is_restarted_and_stop_leaves_no_process_behind(tmp_path: Path) -> None:
    pids_file = tmp_path / "pids.txt"
    settings = load_settings(
        WeatherlightSettings,
        environ={},
        restart_initial_ms=50.0,
        restart_max_ms=200.0,
        stop_timeout_s=0.5,
        poll_interval_ms=20.0,
    )
    health_path = tmp_path / "weatherlight" / "health.json"
    supervisor = Supervisor(
        [
            ServiceSpec("cooperative", (sys.executable, "-c", COOPERATIVE, str(pids_file))),
            ServiceSpec("stubborn", (sys.executable, "-c", STUBBORN)),
        ],
        settings,
        health_path,
    )
    outcome: list[Any] = []
    runner = threading.Thread(target=lambda: outcome.append(supervisor.run()), daemon=True)
    runner.start()
    try:
        first = wait_until(lambda: pids_file.exists() and pids_file.read_text().split(), "the first start")
        first_pid, first_grandchild = int(first[0]), int(first[1])
        stubborn = wait_until(lambda: (service_health(health_path, "stubborn") or {}).get("pid"), "stubborn")
        os.kill(first_pid, 9)

        def restarted() -> dict[str, Any] | None:
            health = service_health(health_path, "cooperative")
            return health if health and health["state"] == "running" and health["restarts"] == 1 else None

        health = wait_until(restarted, "the restart")
        assert health["last_exit_code"] == -9 and health["pid"] != first_pid
        lines = wait_until(
            lambda: len(pids_file.read_text().splitlines()) == 2 and pids_file.read_text(), "the second pids"
        )
        second_pid, second_grandchild = (int(pid) for pid in lines.splitlines()[1].split())
        assert second_pid == health["pid"]
    finally:
        supervisor.request_stop("test over")
        runner.join(timeout=15)
    assert not runner.is_alive()
    assert outcome and outcome[0].reason == "test over"
    # The grandchild of the killed service went with it; so did everything stopped at the end.
    for pid in (first_pid, first_grandchild, second_pid, second_grandchild, stubborn):
        assert not alive(pid), f"process {pid} outlived the supervisor"
    final = {s["name"]: s for s in read_health(health_path)["services"]}
    assert final["stubborn"]["last_exit_code"] == -9  # it ignored SIGTERM and was killed
    assert final["cooperative"]["last_exit_code"] == -15
    assert {s["state"] for s in final.values()} == {"stopped"}


# A stand-in supervisor: starts one bound child, reports its pid, then waits to be killed.
SUPERVISOR = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
print(child.pid, flush=True)
time.sleep(120)
"""
BOUND_CHILD = """
import time
from esper.weatherlight.child import bind_to_parent
assert bind_to_parent()
print("bound", flush=True)
time.sleep(120)
"""


@pytest.mark.slow
def test_a_service_ends_when_its_supervisor_is_killed_with_sigkill() -> None:
    """A SIGKILLed supervisor cannot stop its children: each service binds itself to its supervisor's
    life when it starts (the kernel sends it SIGTERM when the supervisor dies)."""
    import signal
    import subprocess

    supervisor = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, BOUND_CHILD], stdout=subprocess.PIPE, text=True
    )
    child_pid = 0
    try:
        assert supervisor.stdout is not None
        child_pid = int(supervisor.stdout.readline())
        assert supervisor.stdout.readline().strip() == "bound"
        supervisor.send_signal(signal.SIGKILL)
        supervisor.wait(timeout=10)
        wait_until(lambda: not alive(child_pid), "the service to end with its supervisor")
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
        if child_pid and alive(child_pid):
            os.kill(child_pid, signal.SIGKILL)


def test_known_services_start_through_the_binding_entry_point() -> None:
    from esper.weatherlight import SERVICES

    for spec in SERVICES.values():
        assert "from esper.weatherlight.child import main; main()" in spec.argv
