"""Weatherlight's settings: sensible defaults, names from a comma-separated list, invalid values named."""

from __future__ import annotations

from pathlib import Path

import pytest

from esper.leyline import ConfigurationError, EsperSettings, load_settings
from esper.weatherlight import WeatherlightSettings


def test_defaults_run_simic_and_keep_health_under_the_data_directory(tmp_path: Path) -> None:
    settings = load_settings(WeatherlightSettings, environ={})
    assert settings.services == ("simic",)
    esper = load_settings(EsperSettings, environ={}, data_dir=tmp_path)
    assert settings.health_path(esper) == tmp_path / "weatherlight" / "health.json"
    backoff = settings.backoff()
    assert backoff.base_ms == settings.restart_initial_ms and backoff.max_retries == settings.restart_limit


def test_services_are_read_as_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEATHERLIGHT_SERVICES", " simic ")
    assert load_settings(WeatherlightSettings).services == ("simic",)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("WEATHERLIGHT_SERVICES", "simic,nissa-dashboard"),
        ("WEATHERLIGHT_SERVICES", "simic,simic"),
        ("WEATHERLIGHT_SERVICES", " , "),
        ("WEATHERLIGHT_RESTART_MULTIPLIER", "0.5"),
        ("WEATHERLIGHT_RESTART_JITTER", "1.0"),
        ("WEATHERLIGHT_RESTART_LIMIT", "-1"),
        ("WEATHERLIGHT_STOP_TIMEOUT_S", "0"),
        ("WEATHERLIGHT_POLL_INTERVAL_MS", "-5"),
        ("WEATHERLIGHT_RESTART_MAX_MS", "10"),  # below the initial wait
    ],
)
def test_invalid_value_fails_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError, match=variable):
        load_settings(WeatherlightSettings)


def test_unknown_key_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEATHERLIGHT_RESTARTS", "3")
    with pytest.raises(ConfigurationError, match="WEATHERLIGHT_RESTARTS"):
        load_settings(WeatherlightSettings)
