"""Settings resolve once, reject unknown keys and invalid values, and name the variable."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esper.leyline import ConfigurationError, EsperSettings, load_settings, resolve_signing_secret
from esper.leyline.settings import StrictSettings
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


# -- every float setting is finite, every duration bounded (issue 16, item 14) ---------------------------


def _settings_fields(kind: type) -> list[tuple[type[StrictSettings], str]]:
    from esper.cli import _settings_classes

    return [
        (cls, name)
        for cls in _settings_classes()
        for name, field in cls.model_fields.items()
        if field.annotation is kind
    ]


FLOAT_FIELDS = _settings_fields(float)
DURATION_FIELDS = [
    (cls, name) for cls, name in FLOAT_FIELDS + _settings_fields(int) if name.endswith(("_ms", "_s", "_days"))
]


def _variable(cls: type[StrictSettings], name: str) -> str:
    return str(cls.model_config.get("env_prefix", "")) + name.upper()


def _upper_bound(cls: type[StrictSettings], name: str) -> float | None:
    bounds = [
        float(bound)
        for item in cls.model_fields[name].metadata
        for bound in (getattr(item, "le", None), getattr(item, "lt", None))
        if bound is not None
    ]
    return min(bounds) if bounds else None


def test_every_subsystem_has_float_and_duration_settings_to_check() -> None:
    assert len(FLOAT_FIELDS) > 40 and len(DURATION_FIELDS) > 20


@pytest.mark.parametrize(("cls", "name"), DURATION_FIELDS, ids=lambda v: getattr(v, "__name__", v))
def test_every_duration_setting_has_an_upper_bound(cls: type[StrictSettings], name: str) -> None:
    bound = _upper_bound(cls, name)
    assert bound is not None, f"{_variable(cls, name)} has no upper bound"
    # A bounded duration is still a valid sleep, wait or timestamp offset.
    seconds = bound / {"_ms": 1e3, "_s": 1.0, "_days": 1 / 86_400}[name[name.rindex("_") :]]
    assert seconds <= threading.TIMEOUT_MAX and seconds * 1e9 < 2**63


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("KASMINA_COMMAND_FRESHNESS_S", "inf"),
        ("ESPER_COMMAND_FRESHNESS_S", "inf"),
        ("OONA_RETRY_MAX_MS", "inf"),
        ("TAMIYO_STEP_TIMEOUT_MS", "inf"),
        ("TAMIYO_STEP_TIMEOUT_MS", "1e300"),
        ("TAMIYO_STEP_TIMEOUT_MS", "nan"),
        ("SIMIC_REWARD_CLIP", "1e400"),
        ("WEATHERLIGHT_RESTART_MAX_MS", "inf"),
    ],
)
def test_infinite_or_absurd_settings_are_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    from esper.cli import _settings_classes

    monkeypatch.setenv(variable, value)
    cls = next(c for c in _settings_classes() if variable.startswith(_variable(c, "")))
    with pytest.raises(ConfigurationError, match=variable):
        load_settings(cls)


@given(data=st.data())
@settings(max_examples=300)
def test_a_float_setting_is_finite_and_within_its_bounds_or_refused(data: st.DataObject) -> None:
    """Property: whatever text a float variable holds, the settings either refuse it with a
    ConfigurationError naming that variable, or hold a finite value within the field's upper bound."""
    cls, name = data.draw(st.sampled_from(FLOAT_FIELDS))
    value = data.draw(
        st.one_of(
            st.floats(allow_nan=True, allow_infinity=True),
            st.sampled_from(["inf", "-inf", "nan", "Infinity", "1e400", "-1e400", "1e300", "1e-300"]),
        )
    )
    try:
        resolved = load_settings(cls, {}, **{name: str(value)})
    except ConfigurationError as exc:
        assert _variable(cls, name) in str(exc)
        return
    field = getattr(resolved, name)
    assert math.isfinite(field)
    bound = _upper_bound(cls, name)
    assert bound is None or field <= bound


def test_a_dotenv_that_is_not_utf8_is_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_bytes(b"TAMIYO_STEP_TIMEOUT_MS=7.5\nESPER_DATA_DIR=/srv/caf\xe9\n")
    with pytest.raises(ConfigurationError, match=r"\.env is not UTF-8"):
        load_settings(TamiyoSettings)
