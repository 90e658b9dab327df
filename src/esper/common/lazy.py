"""Lazy package exports: a subsystem names its public surface without importing torch to do so.

A command that reads settings or lists field reports must not pay for PyTorch and PyG. A package's
`__init__` declares which module each public name lives in; the module is imported on first access.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """Return a module-level `__getattr__` that imports `names[attr]` (a module path) on first use.

    The value is cached in the package's namespace, so later lookups are plain attribute reads.
    """

    def __getattr__(attr: str) -> Any:
        module_name = names.get(attr)
        if module_name is None:
            raise AttributeError(f"module {package!r} has no attribute {attr!r}")
        value = getattr(importlib.import_module(module_name), attr)
        setattr(importlib.import_module(package), attr, value)
        return value

    return __getattr__
