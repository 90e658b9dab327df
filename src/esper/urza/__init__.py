"""Urza: the blueprint library (catalogue of seed architectures and their module factories).

`BlueprintCatalogue` keeps the descriptors in SQLite and builds modules from the registered factories;
`BUILTIN_SPECS` are the blueprints every catalogue is seeded with. Every change is published on the bus
(`BusChangePublisher`, through the catalogue's outbox) and read back by caches (`CatalogueChangeFeed`).
"""

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

__all__ = [
    "BUILTIN_FACTORIES",
    "BUILTIN_SPECS",
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
    "InvalidDescriptor",
    "Listener",
    "ListenerFailed",
    "NotificationFailed",
    "UnknownBlueprint",
    "UrzaError",
    "count_parameters",
    "param_count",
]
