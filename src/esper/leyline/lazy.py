"""Lazy package exports (`lazy_exports`): defined in `esper.common.lazy`, named here as before."""

from esper.common.lazy import lazy_exports

__all__ = ["lazy_exports"]
