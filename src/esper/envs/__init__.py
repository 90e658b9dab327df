"""Gymnasium environments over Esper runs (a composition root: each episode is built by the run assembly).

Importing this package registers `esper/Growth-v0` with Gymnasium (`gymnasium.make("esper/Growth-v0")`);
`GrowthEnv` itself, and PyTorch with it, load on first use.
"""

from typing import TYPE_CHECKING

import gymnasium

from esper.common.lazy import lazy_exports

if TYPE_CHECKING:
    from esper.envs.growth import EnvError, GrowthEnv

ENV_ID = "esper/Growth-v0"

if ENV_ID not in gymnasium.registry:
    gymnasium.register(id=ENV_ID, entry_point="esper.envs.growth:GrowthEnv")

__getattr__ = lazy_exports(__name__, {"EnvError": "esper.envs.growth", "GrowthEnv": "esper.envs.growth"})

__all__ = ["ENV_ID", "EnvError", "GrowthEnv"]
