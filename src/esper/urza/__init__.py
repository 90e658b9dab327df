"""Urza: the blueprint library (catalogue of seed architectures and their module factories).

`BlueprintCatalogue` keeps the descriptors in SQLite and builds modules from the registered factories;
`BUILTIN_SPECS` are the blueprints every catalogue is seeded with.
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
    DuplicateBlueprint,
    InvalidDescriptor,
    ListenerFailed,
    UnknownBlueprint,
    UrzaError,
)

__all__ = [
    "BUILTIN_FACTORIES",
    "BUILTIN_SPECS",
    "HOST_KINDS",
    "BlueprintCatalogue",
    "BlueprintNotApplicable",
    "BlueprintQuarantined",
    "BlueprintSpec",
    "CatalogueCorrupt",
    "DuplicateBlueprint",
    "Factory",
    "FactoryRegistry",
    "InvalidDescriptor",
    "Listener",
    "ListenerFailed",
    "UnknownBlueprint",
    "UrzaError",
    "count_parameters",
    "param_count",
]
