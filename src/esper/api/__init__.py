"""The public Python API (a composition root): grow a user's own model, or let a user's own training loop
grow it. Runs are built only through `esper.assembly.RunAssembly`. Importing this package loads PyTorch;
`import esper` exposes its names lazily."""

from typing import TYPE_CHECKING

from esper.common.lazy import lazy_exports

if TYPE_CHECKING:
    from esper.api.grow import GrowthResult, grow
    from esper.api.inputs import GrowInputError
    from esper.api.session import GrowthSession, SessionClosed

__getattr__ = lazy_exports(
    __name__,
    {
        "GrowInputError": "esper.api.inputs",
        "GrowthResult": "esper.api.grow",
        "GrowthSession": "esper.api.session",
        "SessionClosed": "esper.api.session",
        "grow": "esper.api.grow",
    },
)

__all__ = ["GrowInputError", "GrowthResult", "GrowthSession", "SessionClosed", "grow"]
