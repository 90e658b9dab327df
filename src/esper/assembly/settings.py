"""Every subsystem's settings for one run, resolved once from the environment, `.env` and overrides."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from esper.kasmina import KasminaSettings
from esper.leyline import EsperSettings, load_settings
from esper.nissa import NissaSettings
from esper.oona import OonaSettings
from esper.tamiyo.settings import TamiyoSettings
from esper.tolaria.settings import TolariaSettings


@dataclass(frozen=True)
class RunSettings:
    """One settings object per subsystem a run touches; nothing in a run reads the environment again."""

    esper: EsperSettings
    tolaria: TolariaSettings
    kasmina: KasminaSettings
    tamiyo: TamiyoSettings
    oona: OonaSettings
    nissa: NissaSettings

    @classmethod
    def resolve(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        esper: Mapping[str, Any] | None = None,
        tolaria: Mapping[str, Any] | None = None,
        kasmina: Mapping[str, Any] | None = None,
        tamiyo: Mapping[str, Any] | None = None,
        oona: Mapping[str, Any] | None = None,
        nissa: Mapping[str, Any] | None = None,
    ) -> RunSettings:
        """Resolve each subsystem's settings once; an override given here wins over the environment.

        Raises `ConfigurationError` naming every unknown or invalid variable, before anything is opened."""
        return cls(
            esper=load_settings(EsperSettings, environ, **dict(esper or {})),
            tolaria=load_settings(TolariaSettings, environ, **dict(tolaria or {})),
            kasmina=load_settings(KasminaSettings, environ, **dict(kasmina or {})),
            tamiyo=load_settings(TamiyoSettings, environ, **dict(tamiyo or {})),
            oona=load_settings(OonaSettings, environ, **dict(oona or {})),
            nissa=load_settings(NissaSettings, environ, **dict(nissa or {})),
        )
