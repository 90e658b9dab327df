"""Urza: the blueprint library (catalogue of seed architectures and their module factories).

`BlueprintCatalogue` keeps the descriptors in SQLite and builds modules from the registered factories;
`BUILTIN_SPECS` are the blueprints every catalogue is seeded with; `GROWTH_OPERATIONS` describe the growth
operations (`op:widen`, `op:deepen`) as blueprints are described. Every change is published on the bus
(`BusChangePublisher`, through the catalogue's outbox) and read back by caches (`CatalogueChangeFeed`).

Names are imported on first use (`esper.leyline.lazy`): importing a settings class or an error of this
package does not load PyTorch.
"""

from typing import TYPE_CHECKING

from esper.leyline.lazy import lazy_exports

if TYPE_CHECKING:
    from esper.urza.blueprints import (
        BUILTIN_FACTORIES,
        BUILTIN_SPECS,
        HOST_KINDS,
        BlueprintSpec,
        Factory,
        FactoryRegistry,
        count_parameters,
        param_count,
    )
    from esper.urza.catalogue import BlueprintCatalogue, Listener
    from esper.urza.errors import (
        BlueprintNotApplicable,
        BlueprintQuarantined,
        CatalogueCorrupt,
        CatalogueTimeout,
        DuplicateBlueprint,
        InvalidDescriptor,
        ListenerFailed,
        NotificationFailed,
        UnknownBlueprint,
        UrzaError,
    )
    from esper.urza.notifications import BusChangePublisher, CatalogueChangeFeed, ChangeBatch, ChangePublisher
    from esper.urza.operations import (
        GROWTH_OPERATIONS,
        GrowthOperation,
        growth_operation,
        require_growth_operation,
    )

_EXPORTS = {
    "BUILTIN_FACTORIES": "esper.urza.blueprints",
    "BUILTIN_SPECS": "esper.urza.blueprints",
    "HOST_KINDS": "esper.urza.blueprints",
    "BlueprintSpec": "esper.urza.blueprints",
    "Factory": "esper.urza.blueprints",
    "FactoryRegistry": "esper.urza.blueprints",
    "count_parameters": "esper.urza.blueprints",
    "param_count": "esper.urza.blueprints",
    "BlueprintCatalogue": "esper.urza.catalogue",
    "Listener": "esper.urza.catalogue",
    "BlueprintNotApplicable": "esper.urza.errors",
    "BlueprintQuarantined": "esper.urza.errors",
    "CatalogueCorrupt": "esper.urza.errors",
    "CatalogueTimeout": "esper.urza.errors",
    "DuplicateBlueprint": "esper.urza.errors",
    "InvalidDescriptor": "esper.urza.errors",
    "ListenerFailed": "esper.urza.errors",
    "NotificationFailed": "esper.urza.errors",
    "UnknownBlueprint": "esper.urza.errors",
    "UrzaError": "esper.urza.errors",
    "GROWTH_OPERATIONS": "esper.urza.operations",
    "GrowthOperation": "esper.urza.operations",
    "growth_operation": "esper.urza.operations",
    "require_growth_operation": "esper.urza.operations",
    "BusChangePublisher": "esper.urza.notifications",
    "CatalogueChangeFeed": "esper.urza.notifications",
    "ChangeBatch": "esper.urza.notifications",
    "ChangePublisher": "esper.urza.notifications",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "BUILTIN_FACTORIES",
    "BUILTIN_SPECS",
    "GROWTH_OPERATIONS",
    "HOST_KINDS",
    "BlueprintCatalogue",
    "BlueprintNotApplicable",
    "BlueprintQuarantined",
    "BlueprintSpec",
    "BusChangePublisher",
    "CatalogueChangeFeed",
    "CatalogueCorrupt",
    "CatalogueTimeout",
    "ChangeBatch",
    "ChangePublisher",
    "DuplicateBlueprint",
    "Factory",
    "FactoryRegistry",
    "GrowthOperation",
    "InvalidDescriptor",
    "Listener",
    "ListenerFailed",
    "NotificationFailed",
    "UnknownBlueprint",
    "UrzaError",
    "count_parameters",
    "growth_operation",
    "param_count",
    "require_growth_operation",
]
