"""Choosing the backend from the deployment's settings."""

from __future__ import annotations

from esper.leyline import ConfigurationError, EsperSettings
from esper.oona.bus import Bus
from esper.oona.embedded import EmbeddedBus
from esper.oona.redis_streams import RedisBus
from esper.oona.settings import OonaSettings

EMBEDDED_FILE = "bus.sqlite3"


def open_bus(esper_settings: EsperSettings, oona_settings: OonaSettings) -> Bus:
    """The bus of this deployment.

    `ESPER_BUS_URL` empty: the embedded bus in `data_dir/bus.sqlite3`; `redis://` or `rediss://`: Redis
    Streams. Anything else is a `ConfigurationError`.
    """
    url = esper_settings.bus_url.strip()
    if not url:
        return EmbeddedBus(esper_settings.data_dir / EMBEDDED_FILE, oona_settings)
    if url.startswith(("redis://", "rediss://")):
        return RedisBus(url, oona_settings)
    raise ConfigurationError(f"ESPER_BUS_URL must be empty (embedded bus) or a redis:// URL, got {url!r}")
