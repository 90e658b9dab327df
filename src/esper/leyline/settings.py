"""Settings: the pattern every subsystem follows, and the settings every subsystem shares.

Each subsystem declares one `StrictSettings` subclass with its own environment prefix (`TAMIYO_`,
`KASMINA_`, ...). It is resolved once, by `load_settings`, at start-up, and the resulting object is passed
down; nothing reads the environment afterwards. Unknown keys and invalid values fail at start with a
`ConfigurationError` naming the variable.

Every float setting is finite (NaN and infinities are refused for all of them, here in the base), and every
duration has an upper bound: a timeout or freshness window of `inf` would switch its check off, and one of
`1e300` overflows where it is turned into a sleep or a timestamp. The bounds below are shared names so that
the subsystems agree on them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from esper.leyline.errors import ConfigurationError

S = TypeVar("S", bound="StrictSettings")

MINUTE_S = 60.0
HOUR_S = 3600.0
DAY_S = 86_400.0
MAX_CLOCK_SKEW_S = 300.0
"""The most a clock may run ahead of the issuer's (a larger window would accept commands from the future)."""
MAX_BACKOFF_MULTIPLIER = 10.0
"""Fastest growth of a retry wait per attempt."""


class StrictSettings(BaseSettings):
    """Base of every subsystem's settings: frozen, no unknown keys, read from env and `.env`."""

    model_config = SettingsConfigDict(
        extra="forbid",
        frozen=True,
        env_file=".env",
        env_file_encoding="utf-8",
        # A `.env` holds every subsystem's settings: each class reads its own prefix (unknown keys under
        # that prefix are still an error).
        dotenv_filtering="match_prefix",
        env_ignore_empty=True,  # `NAME=` means "not set": the default applies
        validate_default=True,
        allow_inf_nan=False,  # no float setting may be NaN or infinite (an infinite window disables a check)
    )


def _env_prefix(cls: type[StrictSettings]) -> str:
    return str(cls.model_config.get("env_prefix", ""))


def _unknown_env_keys(cls: type[StrictSettings], environ: Mapping[str, str]) -> list[str]:
    prefix = _env_prefix(cls)
    if not prefix:
        return []
    known = {prefix + name.upper() for name in cls.model_fields}
    return sorted(key for key in environ if key.upper().startswith(prefix) and key.upper() not in known)


def load_settings(cls: type[S], environ: Mapping[str, str] | None = None, **overrides: Any) -> S:
    """Resolve `cls` once from the environment, `.env` and explicit overrides (which win).

    Raises `ConfigurationError` naming every unknown or invalid variable.
    """
    environ = os.environ if environ is None else environ
    unknown = _unknown_env_keys(cls, environ)
    if unknown:
        raise ConfigurationError(f"unknown setting(s): {', '.join(unknown)}")
    prefix = _env_prefix(cls)
    try:
        return cls(**overrides)
    except UnicodeDecodeError as exc:
        env_file = cls.model_config.get("env_file")
        raise ConfigurationError(
            f"{env_file} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
            "save it as UTF-8"
        ) from exc
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            problems.append(f"{prefix}{field.upper()}: {error['msg']} (got {error.get('input')!r})")
        raise ConfigurationError("invalid setting(s): " + "; ".join(problems)) from exc


class EsperSettings(StrictSettings):
    """Settings shared by every subsystem of one deployment (prefix `ESPER_`)."""

    model_config = SettingsConfigDict(env_prefix="ESPER_")

    data_dir: Path = Field(default=Path("esper-data"), description="Where runs, stores and keys live.")
    signing_secret: SecretStr | None = Field(
        default=None,
        description="HMAC key shared by every process of a deployment; when unset, a random key is "
        "created once in data_dir/signing.key and reused.",
    )
    bus_url: str = Field(
        default="",
        description="`redis://host:port/db` for the Redis backend; empty for the embedded SQLite bus "
        "in data_dir/bus.sqlite3.",
    )
    command_freshness_s: float = Field(
        default=60.0, gt=0, le=HOUR_S, description="Oldest acceptable command."
    )
    clock_skew_s: float = Field(
        default=5.0, ge=0, le=MAX_CLOCK_SKEW_S, description="Allowed issue time in the future."
    )
    log_level: str = Field(default="INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)$")


def resolve_signing_secret(settings: EsperSettings) -> bytes:
    """The deployment's signing key: configured, or created once (mode 0600) under `data_dir`."""
    if settings.signing_secret is not None:
        secret = settings.signing_secret.get_secret_value().encode()
        if len(secret) < 16:
            raise ConfigurationError("ESPER_SIGNING_SECRET must be at least 16 bytes")
        return secret
    key_path = settings.data_dir / "signing.key"
    if not key_path.exists():
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        # Written to a private temporary file, then linked into place: concurrent first starts agree on
        # one key, and no process ever reads a half-written one.
        fd, temporary = tempfile.mkstemp(dir=settings.data_dir, prefix=".signing.key.")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32))
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(temporary, 0o600)
            # Another process may have linked its key first; then everyone uses that one.
            with contextlib.suppress(FileExistsError):
                os.link(temporary, key_path)
        finally:
            os.unlink(temporary)
    secret = key_path.read_text().strip().encode()
    if len(secret) < 16:
        raise ConfigurationError(f"signing key in {key_path} is shorter than 16 bytes")
    return secret
