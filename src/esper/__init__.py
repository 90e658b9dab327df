"""Esper grows neural networks while they train.

Subsystems live in their own packages (docs/architecture.md, "Who may import whom"); the composition
roots are `esper.assembly` (the one recipe for a run), `esper.api` (the Python API), `esper.cli` and
`esper.weatherlight`. The public Python surface is small and imported on first use, so `import esper`
loads neither PyTorch nor PyG:

- `esper.grow` grows a user's `nn.Module` while it trains and returns it (`esper.GrowthResult`);
- `esper.GrowthSession` grows it inside the user's own training loop;
- `esper.GrowthPoint` marks where a user's model may grow;
- `esper.adapt_model` turns a user's `nn.Module` into a host Esper can grow.
"""

from typing import TYPE_CHECKING

from esper.common.lazy import lazy_exports

if TYPE_CHECKING:
    from esper.api.grow import GrowthResult, grow
    from esper.api.session import GrowthSession
    from esper.tolaria.adapt import GrowthPoint, adapt_model

__version__ = "0.1.0"

__getattr__ = lazy_exports(
    __name__,
    {
        "GrowthPoint": "esper.tolaria.adapt",
        "GrowthResult": "esper.api.grow",
        "GrowthSession": "esper.api.session",
        "adapt_model": "esper.tolaria.adapt",
        "grow": "esper.api.grow",
    },
)

__all__ = ["GrowthPoint", "GrowthResult", "GrowthSession", "__version__", "adapt_model", "grow"]
