"""The graph schema: every node type, its features, and every relation Tamiyo's graph may hold.

`TAMIYO_SCHEMA` is the one declaration that the builder, the normaliser and the network all read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy.typing as npt

from esper.leyline import EsperError, pb

if TYPE_CHECKING:
    from esper.tamiyo.model.graph import TamiyoGraph
    from esper.urza.operations import GrowthOperation


EdgeKey = tuple[str, str, str]
FloatArray = npt.NDArray[Any]
BlueprintLookup = Callable[[str], "pb.BlueprintDescriptor | None"]
# Growth operation id (`op:widen`, `op:deepen`) -> its catalogue descriptor, or None (see esper.urza).
GrowthOperationLookup = Callable[[str], "GrowthOperation | None"]


class GraphSchemaError(EsperError):
    """A packet or graph does not fit the declared schema."""

    def __init__(self, where: str, reason: str) -> None:
        self.where = where
        self.reason = reason
        super().__init__(f"graph schema violation at {where}: {reason}")


class MissingFeatureError(EsperError):
    """`strict_graph` is on and the packet lacks values the schema expects."""

    def __init__(self, missing: dict[str, tuple[str, ...]]) -> None:
        self.missing = missing
        named = "; ".join(f"{kind}: {', '.join(keys)}" for kind, keys in sorted(missing.items()))
        super().__init__(f"packet is missing graph features ({named})")


@dataclass(frozen=True)
class NodeSpec:
    """A node type: continuous features (normalised) followed by categorical ones (0/1, as is)."""

    name: str
    continuous: tuple[str, ...]
    categorical: tuple[str, ...] = ()

    @property
    def features(self) -> tuple[str, ...]:
        """Every feature in column order."""
        return self.continuous + self.categorical

    @property
    def dim(self) -> int:
        """Number of feature columns."""
        return len(self.continuous) + len(self.categorical)


@dataclass(frozen=True)
class RelationSpec:
    """A directed relation between two node types, with its named edge features (possibly none)."""

    src: str
    name: str
    dst: str
    edge_features: tuple[str, ...] = ()

    @property
    def key(self) -> EdgeKey:
        """The PyG edge type."""
        return (self.src, self.name, self.dst)

    @property
    def edge_dim(self) -> int:
        """Edge feature width the GAT layers see: a relation without features gets one zero column."""
        return max(1, len(self.edge_features))


@dataclass(frozen=True)
class GraphSchema:
    """The one declaration of Tamiyo's graph: node types, their features, and the relations."""

    version: str
    node_types: tuple[NodeSpec, ...]
    relations: tuple[RelationSpec, ...]

    def __post_init__(self) -> None:
        names = [spec.name for spec in self.node_types]
        if len(set(names)) != len(names):
            raise GraphSchemaError("schema", f"duplicate node types in {names}")
        for spec in self.node_types:
            if len(set(spec.features)) != spec.dim:
                raise GraphSchemaError(f"schema.{spec.name}", "duplicate feature names")
        keys = [rel.key for rel in self.relations]
        if len(set(keys)) != len(keys):
            raise GraphSchemaError("schema", "duplicate relations")
        for rel in self.relations:
            for end in (rel.src, rel.dst):
                if end not in names:
                    raise GraphSchemaError(f"schema.{rel.key}", f"node type {end!r} is not declared")

    @property
    def type_names(self) -> tuple[str, ...]:
        """Node type names in declaration order."""
        return tuple(spec.name for spec in self.node_types)

    def node(self, name: str) -> NodeSpec:
        """The spec of node type `name`; an unknown type is a `GraphSchemaError`."""
        for spec in self.node_types:
            if spec.name == name:
                return spec
        raise GraphSchemaError(f"node type {name!r}", f"not in schema {self.version}")

    def relation(self, key: EdgeKey) -> RelationSpec:
        """The spec of relation `key`; an unknown relation is a `GraphSchemaError`."""
        for rel in self.relations:
            if rel.key == key:
                return rel
        raise GraphSchemaError(f"relation {key}", f"not in schema {self.version}")

    @property
    def digest(self) -> str:
        """Hash of the whole declaration: a checkpoint built for another schema is refused."""
        body = {
            "version": self.version,
            "nodes": [[s.name, list(s.continuous), list(s.categorical)] for s in self.node_types],
            "relations": [[*r.key, list(r.edge_features)] for r in self.relations],
        }
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]

    def check(self, graph: TamiyoGraph) -> None:
        """Fail fast when `graph` has node types, widths or relations the schema does not declare."""
        if set(graph.x) != set(self.type_names):
            raise GraphSchemaError(
                "graph.node_types", f"got {sorted(graph.x)}, schema declares {sorted(self.type_names)}"
            )
        for name, x in graph.x.items():
            spec = self.node(name)
            if x.dim() != 2 or x.shape[1] != spec.dim:
                raise GraphSchemaError(
                    f"graph.x[{name}]", f"shape {tuple(x.shape)}, expected [N, {spec.dim}]"
                )
        for key, index in graph.edge_index.items():
            self.relation(key)
            if index.dim() != 2 or index.shape[0] != 2:
                raise GraphSchemaError(f"graph.edge_index[{key}]", f"shape {tuple(index.shape)}")


STAGE_COLUMNS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("stage_dormant", (pb.SEED_STAGE_DORMANT,)),
    ("stage_germinated", (pb.SEED_STAGE_GERMINATED,)),
    ("stage_training", (pb.SEED_STAGE_TRAINING,)),
    ("stage_blending", (pb.SEED_STAGE_BLENDING,)),
    ("stage_shadowing", (pb.SEED_STAGE_SHADOWING,)),
    ("stage_probationary", (pb.SEED_STAGE_PROBATIONARY,)),
    ("stage_fossilized", (pb.SEED_STAGE_FOSSILIZED,)),
    (
        "stage_cooldown",
        (pb.SEED_STAGE_CULLED, pb.SEED_STAGE_EMBARGOED, pb.SEED_STAGE_RESETTING, pb.SEED_STAGE_TERMINATED),
    ),
)
ACTIVE_STAGES: tuple[int, ...] = (
    pb.SEED_STAGE_GERMINATED,
    pb.SEED_STAGE_TRAINING,
    pb.SEED_STAGE_BLENDING,
    pb.SEED_STAGE_SHADOWING,
    pb.SEED_STAGE_PROBATIONARY,
)
# Keys of `SystemStatePacket.training_metrics` the global node reads.
GLOBAL_METRIC_KEYS: tuple[str, ...] = ("learning_rate", "grad_norm")
# Keys of `SeedState.metrics` a slot node reads; expected only while its seed is active.
SEED_METRIC_KEYS: tuple[str, ...] = (
    "alpha",
    "alpha_steps",
    "alpha_total_steps",
    "blend_allowed",
    "isolation_violations",
)

# v2: layer nodes carry what a WIDEN or DEEPEN decision needs (growth applied and live on the layer, the
# budget left, whether the layer may widen or deepen now). A policy checkpoint of v1 is refused.
# Continuous growth features of a layer node, read per packet (not per topology): units its kept and live
# widens added (log1p), whether a growth is live on it, deepens after it, the growth budget left as a
# fraction of `max_parameters` (absent without a budget), and one widened unit's cost as a fraction of
# the budget (absent without a budget or when the topology does not say).
LAYER_GROWTH_FEATURES: tuple[str, ...] = (
    "grown_units_log",
    "growth_live",
    "deepened",
    "budget_left_frac",
    "unit_cost_frac",
)

TAMIYO_SCHEMA = GraphSchema(
    version="tamiyo-graph-v2",
    node_types=(
        NodeSpec(
            "global",
            continuous=(
                "epoch_log",
                "global_step_log",
                "validation_loss",
                "validation_accuracy",
                "training_loss",
                "loss_gap",
                "layers_log",
                "slots_log",
                "blueprints_log",
                "active_seed_frac",
                "hw_memory_free_frac",
                "hw_utilization",
                "hw_temperature",
                *(f"metric_{key}" for key in GLOBAL_METRIC_KEYS),
            ),
        ),
        NodeSpec(
            "layer",
            continuous=(
                "width_log",
                "depth_frac",
                "params_log",
                "slot_count",
                *LAYER_GROWTH_FEATURES,
            ),
            categorical=("kind_linear", "kind_conv", "kind_other", "can_widen", "can_deepen"),
        ),
        NodeSpec(
            "slot",
            continuous=(
                "width_log",
                "gradient_norm_log",
                "learning_rate",
                "age_epochs_log",
                "risk_score",
                "alpha",
                "alpha_progress",
                "blend_allowed",
                "isolation_violations",
            ),
            categorical=("kind_mlp", "kind_conv", "has_seed_state", *(name for name, _ in STAGE_COLUMNS)),
        ),
        NodeSpec(
            "blueprint",
            continuous=("in_use", "risk", "stage"),
            categorical=(
                "tier_safe",
                "tier_experimental",
                "tier_high_risk",
                "quarantine",
                "host_mlp",
                "host_conv",
            ),
        ),
    ),
    relations=(
        RelationSpec("global", "conditions", "layer"),
        RelationSpec("layer", "summarises", "global"),
        RelationSpec("layer", "feeds", "layer", ("depth_gap",)),
        RelationSpec("layer", "hosts", "slot", ("width_ratio",)),
        RelationSpec("slot", "attaches", "layer", ("width_ratio",)),
        RelationSpec("blueprint", "offered_to", "slot", ("in_use",)),
        RelationSpec("slot", "considers", "blueprint", ("in_use",)),
    ),
)
