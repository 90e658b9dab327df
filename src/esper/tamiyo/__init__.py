"""Tamiyo: the controller that decides, from a graph view of a training run, what to grow and when.

Tamiyo follows the design of record (DESIGN.md §4, "Tamiyo — the controller"), not the legacy detailed
design of the prototype it replaces. The public surface is deliberately small: the service and the policy
classes. Everything else in this package is internal and may change.

Names are imported on first use (`esper.leyline.lazy`): importing a settings class or an error of this
package does not load PyTorch.
"""

from typing import TYPE_CHECKING

from esper.leyline.lazy import lazy_exports

if TYPE_CHECKING:
    from esper.tamiyo.model.heuristic import HeuristicPolicy
    from esper.tamiyo.model.policy import GNNPolicy
    from esper.tamiyo.runtime.service import TamiyoService

_EXPORTS = {
    "HeuristicPolicy": "esper.tamiyo.model.heuristic",
    "GNNPolicy": "esper.tamiyo.model.policy",
    "TamiyoService": "esper.tamiyo.runtime.service",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)

__all__ = ["GNNPolicy", "HeuristicPolicy", "TamiyoService"]
