"""Tamiyo: the controller that decides, from a graph view of a training run, what to grow and when.

Tamiyo follows the design of record (DESIGN.md §4, "Tamiyo — the controller"), not the legacy detailed
design of the prototype it replaces. It has three parts: `model` (the graph, the policies, the checkpoint
format; what Simic trains), `runtime` (the service and what it runs on) and `records` (the store, field
reports, the outbox). Other subsystems import only the names below and `esper.tamiyo.settings`; Simic may
also import `esper.tamiyo.model`. Everything else may change.

Names are imported on first use (`esper.leyline.lazy`): importing a settings class or an error of this
package does not load PyTorch, and importing the model does not start the runtime's modules.
"""

from typing import TYPE_CHECKING

from esper.leyline.lazy import lazy_exports

if TYPE_CHECKING:
    from esper.tamiyo.model.builder import GraphBuilder
    from esper.tamiyo.model.checkpoint import (
        CheckpointIncompatible,
        PolicyUpdateRejected,
        read_payload_header,
    )
    from esper.tamiyo.model.graph import TamiyoGraph
    from esper.tamiyo.model.heuristic import HeuristicPolicy
    from esper.tamiyo.model.policy import GNNPolicy
    from esper.tamiyo.model.proposal import Policy, Proposal
    from esper.tamiyo.records.errors import StoreError
    from esper.tamiyo.records.schema import OUTBOX_STATUSES
    from esper.tamiyo.records.store import TamiyoStore
    from esper.tamiyo.runtime.metadata import BlueprintMetadataCache
    from esper.tamiyo.runtime.service import TamiyoService
    from esper.tamiyo.runtime.update_feed import PolicyUpdateFeed
    from esper.tamiyo.runtime.updates import PolicyUpdateIntake
    from esper.tamiyo.runtime.worker import DeadlineExceeded

_EXPORTS = {
    "BlueprintMetadataCache": "esper.tamiyo.runtime.metadata",
    "CheckpointIncompatible": "esper.tamiyo.model.checkpoint",
    "DeadlineExceeded": "esper.tamiyo.runtime.worker",
    "GNNPolicy": "esper.tamiyo.model.policy",
    "GraphBuilder": "esper.tamiyo.model.builder",
    "HeuristicPolicy": "esper.tamiyo.model.heuristic",
    "OUTBOX_STATUSES": "esper.tamiyo.records.schema",
    "Policy": "esper.tamiyo.model.proposal",
    "Proposal": "esper.tamiyo.model.proposal",
    "PolicyUpdateFeed": "esper.tamiyo.runtime.update_feed",
    "PolicyUpdateIntake": "esper.tamiyo.runtime.updates",
    "PolicyUpdateRejected": "esper.tamiyo.model.checkpoint",
    "StoreError": "esper.tamiyo.records.errors",
    "TamiyoGraph": "esper.tamiyo.model.graph",
    "TamiyoService": "esper.tamiyo.runtime.service",
    "TamiyoStore": "esper.tamiyo.records.store",
    "read_payload_header": "esper.tamiyo.model.checkpoint",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "OUTBOX_STATUSES",
    "BlueprintMetadataCache",
    "CheckpointIncompatible",
    "DeadlineExceeded",
    "GNNPolicy",
    "GraphBuilder",
    "HeuristicPolicy",
    "Policy",
    "Proposal",
    "PolicyUpdateFeed",
    "PolicyUpdateIntake",
    "PolicyUpdateRejected",
    "StoreError",
    "TamiyoGraph",
    "TamiyoService",
    "TamiyoStore",
    "read_payload_header",
]
