"""Settings resolve once, reject unknown keys and invalid values, and name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from esper.leyline import ConfigurationError, EsperSettings, load_settings, resolve_signing_secret
from esper.tamiyo.settings import TamiyoSettings


def test_tamiyo_defaults_follow_the_brief() -> None:
    settings = load_settings(TamiyoSettings, environ={})
    assert settings.step_timeout_ms == 5.0
    assert settings.fr_obs_window_epochs == 1
    assert settings.fr_retry_backoff_mult >= 1.0


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAMIYO_STEP_TIMEOUT_MS", "12.5")
    assert load_settings(TamiyoSettings).step_timeout_ms == 12.5


def test_constructor_override_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAMIYO_STEP_TIMEOUT_MS", "12.5")
    assert load_settings(TamiyoSettings, step_timeout_ms=3.0).step_timeout_ms == 3.0


@pytest.mark.parametrize(
    ("variable", "value"),
    [("TAMIYO_STEP_TIMEOUT_MS", "-1"), ("TAMIYO_FR_RETRY_BACKOFF_MULT", "0.5"), ("TAMIYO_DEVICE", "tpu")],
)
def test_invalid_value_fails_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError, match=variable):
        load_settings(TamiyoSettings)


def test_unknown_key_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAMIYO_STEP_TIMEOUT", "5")
    with pytest.raises(ConfigurationError, match="TAMIYO_STEP_TIMEOUT"):
        load_settings(TamiyoSettings)


def test_one_dotenv_file_serves_every_subsystem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A `.env` holds the settings of several subsystems: each class takes its own prefix and ignores the
    others'; an unknown key under a class's prefix is still an error naming it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(
        "# deployment\nESPER_DATA_DIR=/srv/esper\nTAMIYO_STEP_TIMEOUT_MS=7.5\nOONA_MAXLEN=50\n"
    )
    assert load_settings(EsperSettings).data_dir == Path("/srv/esper")
    assert load_settings(TamiyoSettings).step_timeout_ms == 7.5
    monkeypatch.setenv("TAMIYO_STEP_TIMEOUT_MS", "6.0")  # the environment wins over the file
    assert load_settings(TamiyoSettings).step_timeout_ms == 6.0
    (tmp_path / ".env").write_text("ESPER_DATA_DIR=/srv/esper\nTAMIYO_STEP_TIMEOUT=7.5\n")
    assert load_settings(EsperSettings).data_dir == Path("/srv/esper")
    with pytest.raises(ConfigurationError, match="TAMIYO_STEP_TIMEOUT"):
        load_settings(TamiyoSettings)


def test_settings_are_frozen() -> None:
    settings = load_settings(TamiyoSettings, environ={})
    with pytest.raises(ValueError, match="frozen"):
        settings.step_timeout_ms = 1.0  # type: ignore[misc]


def test_signing_secret_is_created_once_and_reused(tmp_path: Path) -> None:
    settings = load_settings(EsperSettings, environ={}, data_dir=tmp_path)
    first = resolve_signing_secret(settings)
    assert len(first) >= 16
    assert resolve_signing_secret(settings) == first
    assert (tmp_path / "signing.key").stat().st_mode & 0o777 == 0o600


def test_short_configured_secret_is_rejected(tmp_path: Path) -> None:
    settings = load_settings(EsperSettings, environ={}, data_dir=tmp_path, signing_secret="short")
    with pytest.raises(ConfigurationError, match="ESPER_SIGNING_SECRET"):
        resolve_signing_secret(settings)


def test_concurrent_first_starts_agree_on_one_signing_key(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    settings = load_settings(EsperSettings, {}, data_dir=tmp_path / "data")
    with ThreadPoolExecutor(8) as pool:
        keys = set(pool.map(lambda _: resolve_signing_secret(settings), range(32)))
    assert len(keys) == 1
    assert (tmp_path / "data" / "signing.key").stat().st_mode & 0o777 == 0o600
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["signing.key"]
