"""Fixtures shared by every test package: a private Redis server and a bus of either backend.

Redis tests need a `redis-server` binary. Without one they are skipped, unless `REDIS_TESTS_REQUIRED=1`
(CI sets it): then they fail, because a skipped conformance run on Redis proves nothing. The dashboard's
browser tests need Chromium, on the same terms (`CHROMIUM_TESTS_REQUIRED=1`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis
from hypothesis import settings as hypothesis_settings
from typer.testing import CliRunner, Result

from esper.leyline import EsperSettings, load_settings
from esper.oona import Bus, OonaSettings, open_bus
from esper.oona.local_redis import LocalRedisServer, RedisServerMissing

if TYPE_CHECKING:
    from esper.assembly import RunSummary

REDIS_REQUIRED = os.environ.get("REDIS_TESTS_REQUIRED") == "1"
CHROMIUM_REQUIRED = os.environ.get("CHROMIUM_TESTS_REQUIRED") == "1"

# No per-example time limit in property tests: timing is measured by benchmarks, and on a loaded test
# machine a preempted example would otherwise fail a test that is correct.
hypothesis_settings.register_profile("esper", deadline=None)
hypothesis_settings.load_profile("esper")


# `esper run` for one quick epoch: no progress bar, no report.
QUICK_RUN = ("--epochs", "1", "--no-progress", "--no-report")


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`ESPER_DATA_DIR` under the test's folder, a signing secret, and the test's folder as the working
    directory (no stray .env)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ESPER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ESPER_SIGNING_SECRET", "esper-test-secret-0123456789")
    return tmp_path / "data"


def esper_run(*args: str) -> Result:
    """`esper run` with `QUICK_RUN` and then `args`, in this process."""
    from esper.cli import app

    return CliRunner().invoke(app, ["run", *QUICK_RUN, *args], terminal_width=200)


def finished_summary(**fields: Any) -> RunSummary:
    """The summary of a completed run of one epoch (10 steps, half right, no growth), `fields` changed."""
    from esper.assembly import RunSummary

    plain: dict[str, Any] = {
        "run_id": "run-test",
        "task": "spirals",
        "host": "mlp",
        "policy": "heuristic",
        "epochs": 1,
        "steps": 10,
        "final_val_accuracy": 0.5,
        "final_val_loss": 1.0,
        "best_val_accuracy": 0.5,
        "params_initial": 100,
        "params_final": 100,
        "max_params": None,
        "seeds_fossilized": 0,
        "rollbacks": 0,
        "decisions": 0,
        "decision_deadline_misses": 0,
        "resumed_from_step": None,
        "wall_seconds": 0.0,
        "status": "completed",
        "halt": None,
    }
    return RunSummary(**(plain | fields))


def local_redis(workdir: Path, port: int | None = None) -> LocalRedisServer:
    """A (not yet started) private redis-server; skips the test, or fails it in CI, if none is installed."""
    try:
        return LocalRedisServer(workdir, port)
    except RedisServerMissing as exc:
        if REDIS_REQUIRED:
            pytest.fail(f"REDIS_TESTS_REQUIRED=1 but Redis tests cannot run: {exc}", pytrace=False)
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def chromium() -> str:
    """A Chromium for headless browser tests; skips the test, or fails it in CI, if none is installed."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path is not None:
            return path
    if CHROMIUM_REQUIRED:
        pytest.fail("CHROMIUM_TESTS_REQUIRED=1 but no chromium binary is on PATH", pytrace=False)
    pytest.skip("no chromium binary on PATH")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisServer]:
    """One private redis-server (127.0.0.1, free port, no persistence) for the whole session."""
    server = local_redis(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[LocalRedisServer]:
    """A redis-server of the test's own, which the test may kill and restart."""
    server = local_redis(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass(frozen=True)
class BusSpec:
    """How to open one test bus; picklable, so that spawned processes can open the same bus."""

    backend: str
    esper: EsperSettings
    oona: OonaSettings

    def with_settings(self, **overrides: Any) -> BusSpec:
        """The same bus with some `OonaSettings` changed."""
        return BusSpec(self.backend, self.esper, self.oona.model_copy(update=overrides))

    def open(self) -> Bus:
        """A new connection to the bus."""
        return open_bus(self.esper, self.oona)


def fast_oona_settings(**overrides: Any) -> OonaSettings:
    """Oona settings for tests: short retries, so an outage is noticed in milliseconds."""
    defaults: dict[str, Any] = {
        "retry_base_ms": 5.0,
        "retry_max_ms": 50.0,
        "retry_limit": 3,
        "socket_timeout_s": 2.0,
        "poll_interval_ms": 2.0,
        "emergency_poll_ms": 20,
    }
    return load_settings(OonaSettings, environ={}, **(defaults | overrides))


@pytest.fixture(params=["embedded", pytest.param("redis", marks=pytest.mark.redis)])
def bus_spec(request: pytest.FixtureRequest, tmp_path: Path) -> BusSpec:
    """A fresh, empty bus of each backend in turn."""
    url = ""
    if request.param == "redis":
        server: LocalRedisServer = request.getfixturevalue("redis_server")
        client = redis.Redis.from_url(server.url)
        client.flushall()
        client.close()
        url = server.url
    esper = load_settings(EsperSettings, environ={}, data_dir=tmp_path / "data", bus_url=url)
    return BusSpec(str(request.param), esper, fast_oona_settings())


@pytest.fixture
def make_bus(bus_spec: BusSpec) -> Iterator[Callable[..., Bus]]:
    """Opens buses on the test's bus (with optional `OonaSettings` overrides) and closes them after."""
    opened: list[Bus] = []

    def factory(**overrides: Any) -> Bus:
        bus = bus_spec.with_settings(**overrides).open()
        opened.append(bus)
        return bus

    yield factory
    for bus in opened:
        bus.close()


_INTEGRATION = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/integration trains or spawns processes for real: it belongs to the slow
    tier (`make test-fast` runs the rest, `make test` everything)."""
    for item in items:
        if _INTEGRATION in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.slow)
