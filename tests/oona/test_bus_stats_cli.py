"""`esper bus stats` shows what is on the configured bus, as a table or as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from esper.cli import app
from esper.leyline import EsperSettings, load_settings
from esper.oona import EmergencyBroadcaster, Streams, open_bus
from esper.oona.local_redis import LocalRedisServer
from tests.conftest import fast_oona_settings

runner = CliRunner()


def fill(bus_url: str, data_dir: Path) -> None:
    settings = load_settings(EsperSettings, environ={}, data_dir=data_dir, bus_url=bus_url)
    bus = open_bus(settings, fast_oona_settings(max_deliveries=1))
    broadcaster = EmergencyBroadcaster(bus, origin="test", secret=b"stats-test-secret-0123456789")
    for reason in ("a", "b", "c"):
        broadcaster.halt(reason)
    bus.ensure_group(Streams.EMERGENCY, "tolaria")
    bus.consume(Streams.EMERGENCY, "tolaria", "t1", count=2)
    bus.reclaim(Streams.EMERGENCY, "tolaria", "t1", min_idle_ms=0, count=1)  # dead-letters one
    bus.close()


def test_bus_stats_as_json_on_the_embedded_bus(tmp_path: Path) -> None:
    fill("", tmp_path)
    result = runner.invoke(app, ["bus", "stats", "--json"], env={"ESPER_DATA_DIR": str(tmp_path)})
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["bus"].endswith("bus.sqlite3")
    (stream,) = payload["streams"]
    assert stream == {
        "stream": Streams.EMERGENCY,
        "length": 3,
        "groups": [{"name": "tolaria", "consumers": 1, "pending": 1}],
        "dead_letters": 1,
    }


@pytest.mark.redis
def test_bus_stats_table_on_redis(tmp_path: Path, redis_server: LocalRedisServer) -> None:
    fill(redis_server.url, tmp_path)
    result = runner.invoke(
        app, ["bus", "stats"], env={"ESPER_DATA_DIR": str(tmp_path), "ESPER_BUS_URL": redis_server.url}
    )
    assert result.exit_code == 0, result.output
    assert Streams.EMERGENCY in result.stdout and "tolaria" in result.stdout


def test_bus_stats_refuses_an_unknown_bus_url(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["bus", "stats"], env={"ESPER_DATA_DIR": str(tmp_path), "ESPER_BUS_URL": "kafka://x"}
    )
    assert result.exit_code == 2
    assert "ESPER_BUS_URL" in result.output
