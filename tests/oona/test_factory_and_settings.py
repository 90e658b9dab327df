"""Choosing the backend from settings; Oona's settings resolve strictly; telemetry routing by priority."""

from __future__ import annotations

from pathlib import Path

import pytest

from esper.leyline import ConfigurationError, EsperSettings, load_settings, pb
from esper.oona import EmbeddedBus, OonaSettings, RedisBus, Streams, open_bus, telemetry_stream
from esper.oona.envelopes import MESSAGE_TYPES, envelope_for, message_type_of


def esper_settings(tmp_path: Path, url: str) -> EsperSettings:
    return load_settings(EsperSettings, environ={}, data_dir=tmp_path, bus_url=url)


def test_an_empty_url_opens_the_embedded_bus_in_the_data_dir(tmp_path: Path) -> None:
    bus = open_bus(esper_settings(tmp_path, ""), load_settings(OonaSettings, environ={}))
    assert isinstance(bus, EmbeddedBus)
    assert bus.path == tmp_path / "bus.sqlite3" and bus.path.exists()
    bus.close()


def test_a_redis_url_opens_the_redis_bus_without_connecting(tmp_path: Path) -> None:
    bus = open_bus(esper_settings(tmp_path, "redis://127.0.0.1:1/0"), load_settings(OonaSettings, environ={}))
    assert isinstance(bus, RedisBus)
    bus.close()


@pytest.mark.parametrize("url", ["kafka://broker:9092", "127.0.0.1:6379", "sqlite:///bus.db"])
def test_any_other_url_is_a_configuration_error(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigurationError, match="ESPER_BUS_URL"):
        open_bus(esper_settings(tmp_path, url), load_settings(OonaSettings, environ={}))


def test_oona_settings_read_the_environment_and_reject_unknown_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OONA_MAX_DELIVERIES", "7")
    monkeypatch.setenv("OONA_MAXLEN", "1000")
    settings = load_settings(OonaSettings)
    assert (settings.max_deliveries, settings.maxlen) == (7, 1000)
    assert settings.backoff().max_retries == settings.retry_limit
    monkeypatch.setenv("OONA_MAX_DELIVERY", "3")
    with pytest.raises(ConfigurationError, match="OONA_MAX_DELIVERY"):
        load_settings(OonaSettings)


@pytest.mark.parametrize(("variable", "value"), [("OONA_MAX_DELIVERIES", "0"), ("OONA_RETRY_JITTER", "1.5")])
def test_invalid_oona_settings_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError, match=variable):
        load_settings(OonaSettings)


@pytest.mark.parametrize(
    ("priority", "stream"),
    [
        (pb.MESSAGE_PRIORITY_UNSPECIFIED, Streams.TELEMETRY),
        (pb.MESSAGE_PRIORITY_LOW, Streams.TELEMETRY),
        (pb.MESSAGE_PRIORITY_NORMAL, Streams.TELEMETRY),
        (pb.MESSAGE_PRIORITY_HIGH, Streams.EMERGENCY),
        (pb.MESSAGE_PRIORITY_CRITICAL, Streams.EMERGENCY),
    ],
)
def test_high_and_critical_telemetry_goes_to_the_emergency_stream(priority: int, stream: str) -> None:
    assert telemetry_stream(pb.TelemetryPacket(priority=priority)) == stream


def test_every_bus_message_type_has_exactly_one_message_class() -> None:
    declared = set(pb.BusMessageType.values()) - {pb.BUS_MESSAGE_TYPE_UNSPECIFIED}
    assert sorted(MESSAGE_TYPES.values()) == sorted(declared)
    with pytest.raises(TypeError, match="SeedState"):
        message_type_of(pb.SeedState)
    with pytest.raises(TypeError):
        envelope_for(pb.SeedState())
