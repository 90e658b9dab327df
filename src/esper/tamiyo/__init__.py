"""Tamiyo: the controller that decides, from a graph view of a training run, what to grow and when.

Tamiyo follows the design of record (DESIGN.md §4, "Tamiyo — the controller"), not the legacy detailed
design of the prototype it replaces. The public surface is deliberately small: the service and the policy
classes. Everything else in this package is internal and may change.
"""

from esper.tamiyo.heuristic import HeuristicPolicy
from esper.tamiyo.policy import GNNPolicy
from esper.tamiyo.service import TamiyoService

__all__ = ["GNNPolicy", "HeuristicPolicy", "TamiyoService"]
