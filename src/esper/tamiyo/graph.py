"""Packet -> heterogeneous graph, declared by one schema.

`TAMIYO_SCHEMA` names every node type, every feature of each type and every relation (with its edge
features). The builder turns a `SystemStatePacket` into a `TamiyoGraph` (plain tensor dicts on the hot
path, `to_hetero_data()` for PyTorch Geometric tooling) and refuses a packet that does not fit: a slot on
an unknown layer, a seed on an unknown slot, a duplicate id. Ids in the graph are the packet's own; nothing
is invented.

Missing values (a metric key absent, no hardware context, no catalogue entry) are zeroed *and* recorded:
in a presence mask the model sees, and in `GraphCoverage`, which names the missing keys for telemetry.
With `strict_graph` they raise instead. Caps on node counts apply to edges too; coverage says what was cut.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from esper.leyline import EsperError, pb
from esper.tamiyo.normalizer_state import NormalizerState, NormalizerStore
from esper.tamiyo.proposal import ACTIONS

if TYPE_CHECKING:
    from torch_geometric.data import HeteroData

    from esper.tamiyo.settings import TamiyoSettings

EdgeKey = tuple[str, str, str]
_Array = npt.NDArray[Any]
BlueprintLookup = Callable[[str], "pb.BlueprintDescriptor | None"]


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


class NormalizerWriteError(EsperError):
    """The normaliser statistics could not be persisted; the stored copy is stale."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"normaliser statistics were not saved: {reason}")


# ------------------------------------------------------------------------------------------------------
# Schema
# ------------------------------------------------------------------------------------------------------


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


_STAGE_COLUMNS: tuple[tuple[str, tuple[int, ...]], ...] = (
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

TAMIYO_SCHEMA = GraphSchema(
    version="tamiyo-graph-v1",
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
            continuous=("width_log", "depth_frac", "params_log", "slot_count"),
            categorical=("kind_linear", "kind_conv", "kind_other"),
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
            categorical=("kind_mlp", "kind_conv", "has_seed_state", *(name for name, _ in _STAGE_COLUMNS)),
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


# ------------------------------------------------------------------------------------------------------
# The graph
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GraphCoverage:
    """What the graph could not represent: missing feature keys, nodes/edges cut by caps, and active seeds
    whose blueprint has no node (`unlinked_seeds`: slot id -> why: no blueprint id, or one not offered or
    cut by the cap), so the seed is in the graph without the edge to what it grows."""

    present_fraction: dict[str, float]
    missing: dict[str, tuple[str, ...]]
    dropped_nodes: dict[str, int]
    dropped_edges: dict[str, int]
    unlinked_seeds: dict[str, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """True when nothing was missing, nothing was cut and every active seed is linked."""
        return (
            not self.missing
            and not any(self.dropped_nodes.values())
            and not any(self.dropped_edges.values())
            and not self.unlinked_seeds
        )


@dataclass(frozen=True)
class TamiyoGraph:
    """One graph (or a batch of graphs) as plain tensors, in schema order.

    `x` holds the normalised features with missing entries zeroed; `mask` their presence (1 present).
    `slot_action_mask[i, a]` says whether slot node i is a legal target of action head index a;
    `action_mask[g, a]` whether action a is legal in graph g. `batch` maps each node to its graph.
    """

    x: dict[str, Tensor]
    mask: dict[str, Tensor]
    edge_index: dict[EdgeKey, Tensor]
    edge_attr: dict[EdgeKey, Tensor]
    batch: dict[str, Tensor]
    num_graphs: int
    action_mask: Tensor
    slot_action_mask: Tensor
    slot_ids: tuple[str, ...]
    seed_ids: tuple[str, ...]
    blueprint_ids: tuple[str, ...]
    coverage: GraphCoverage | None = None
    # The normaliser statistics each node type was normalised with (a built graph; None for a batch), so a
    # decision can record exactly what its graph was made from.
    normalized_with: dict[str, NormalizerState] | None = None

    def num_nodes(self, node_type: str) -> int:
        """Nodes of one type (over the whole batch)."""
        return int(self.x[node_type].shape[0])

    def to_hetero_data(self) -> HeteroData:
        """The same graph as a PyG `HeteroData` (for tooling and batching; not used on the hot path)."""
        from torch_geometric.data import HeteroData

        data = HeteroData()
        for name, x in self.x.items():
            data[name].x = x
            data[name].mask = self.mask[name]
        for key, index in self.edge_index.items():
            data[key].edge_index = index
            if key in self.edge_attr:
                data[key].edge_attr = self.edge_attr[key]
        data["slot"].action_mask = self.slot_action_mask
        return data


def collate(graphs: Sequence[TamiyoGraph]) -> TamiyoGraph:
    """Batch single graphs into one disjoint graph (indices offset, `batch` vectors filled)."""
    if not graphs:
        raise GraphSchemaError("collate", "no graphs to batch")
    types = list(graphs[0].x)
    offsets = {name: 0 for name in types}
    xs: dict[str, list[Tensor]] = {name: [] for name in types}
    masks: dict[str, list[Tensor]] = {name: [] for name in types}
    batches: dict[str, list[Tensor]] = {name: [] for name in types}
    edges: dict[EdgeKey, list[Tensor]] = {key: [] for key in graphs[0].edge_index}
    attrs: dict[EdgeKey, list[Tensor]] = {key: [] for key in graphs[0].edge_attr}
    for g_index, graph in enumerate(graphs):
        if graph.num_graphs != 1:
            raise GraphSchemaError("collate", "graphs must be single graphs")
        if list(graph.x) != types or set(graph.edge_index) != set(edges):
            raise GraphSchemaError("collate", "graphs do not share one schema")
        for key, index in graph.edge_index.items():
            shift = torch.tensor([[offsets[key[0]]], [offsets[key[2]]]], dtype=index.dtype)
            edges[key].append(index + shift)
        for key, attr in graph.edge_attr.items():
            attrs[key].append(attr)
        for name in types:
            count = graph.num_nodes(name)
            xs[name].append(graph.x[name])
            masks[name].append(graph.mask[name])
            batches[name].append(torch.full((count,), g_index, dtype=torch.long))
            offsets[name] += count
    return TamiyoGraph(
        x={name: torch.cat(parts) for name, parts in xs.items()},
        mask={name: torch.cat(parts) for name, parts in masks.items()},
        edge_index={key: torch.cat(parts, dim=1) for key, parts in edges.items()},
        edge_attr={key: torch.cat(parts) for key, parts in attrs.items()},
        batch={name: torch.cat(parts) for name, parts in batches.items()},
        num_graphs=len(graphs),
        action_mask=torch.cat([graph.action_mask for graph in graphs]),
        slot_action_mask=torch.cat([graph.slot_action_mask for graph in graphs]),
        slot_ids=tuple(sid for graph in graphs for sid in graph.slot_ids),
        seed_ids=tuple(sid for graph in graphs for sid in graph.seed_ids),
        blueprint_ids=tuple(bid for graph in graphs for bid in graph.blueprint_ids),
    )


class FeatureNormalizer:
    """Per-feature running mean/variance (Welford, batched), kept through a `NormalizerStore`.

    The statistics are a few dozen float64 numbers: they are kept and updated as NumPy arrays, where one
    operation costs a microsecond instead of a tensor operation's several (commit runs once per decision).
    """

    def __init__(self, schema: GraphSchema, store: NormalizerStore | None, flush_every: int) -> None:
        self._schema = schema
        self._store = store
        self._flush_every = flush_every
        self._lock = threading.Lock()
        self._updates_since_flush = 0
        self._pending: list[tuple[str, _Array, _Array]] = []
        self._scaled: dict[str, tuple[_Array, _Array]] = {}
        self._count: dict[str, _Array] = {}
        self._mean: dict[str, _Array] = {}
        self._m2: dict[str, _Array] = {}
        for spec in schema.node_types:
            width = len(spec.continuous)
            self._count[spec.name] = np.zeros(width, dtype=np.float64)
            self._mean[spec.name] = np.zeros(width, dtype=np.float64)
            self._m2[spec.name] = np.zeros(width, dtype=np.float64)
        saved = store.load() if store is not None else None
        if saved is not None:
            self._restore(saved)

    def _restore(self, saved: dict[str, NormalizerState]) -> None:
        for name, state in saved.items():
            spec = self._schema.node(name)
            width = len(spec.continuous)
            if not len(state.count) == len(state.mean) == len(state.m2) == width:
                raise GraphSchemaError(
                    f"normaliser[{name}]", f"saved statistics have the wrong width (expected {width})"
                )
            self._count[name] = np.array(state.count, dtype=np.float64)
            self._mean[name] = np.array(state.mean, dtype=np.float64)
            self._m2[name] = np.array(state.m2, dtype=np.float64)

    @property
    def flush_due(self) -> bool:
        """True when enough updates accumulated since the last write."""
        with self._lock:
            pending = len(self._pending)
        return self._store is not None and self._updates_since_flush + pending >= self._flush_every

    def normalize(self, name: str, values: Tensor, present: Tensor, *, update: bool) -> Tensor:
        """Normalise the continuous columns of `values` (float32 [N, F]); missing entries stay 0.

        A graph is normalised with the statistics of every *earlier* graph; with `update` its own values
        are queued and folded in by `commit()` (the service calls it after the decision, off the deadline;
        the next `normalize` or `states` does it otherwise).
        """
        if values.shape[1] == 0 or values.shape[0] == 0:
            return values
        array = values.detach().cpu().numpy().astype(np.float32)
        mask = present.detach().cpu().numpy().astype(np.float32)
        return torch.from_numpy(self.normalize_array(name, array, mask, update=update))

    def normalize_array(
        self,
        name: str,
        values: _Array,
        present: _Array,
        *,
        update: bool,
        used: dict[str, NormalizerState] | None = None,
    ) -> _Array:
        """`normalize` on float32 NumPy arrays (the builder's path: no tensor operations). With `used`, the
        statistics this call normalised with are put there under `name` (taken with the scale, atomically).
        """
        with self._lock:
            if used is not None:
                # The arrays are replaced, never changed in place, so these are the statistics in use.
                used[name] = NormalizerState(
                    self._count[name].tolist(), self._mean[name].tolist(), self._m2[name].tolist()
                )
            if values.shape[1] == 0 or values.shape[0] == 0:
                return values
            mean, scale = self._scaled.get(name) or self._scale(name)
            if update:
                self._pending.append((name, values, present))
        out: _Array = np.clip((values - mean) / scale, -10.0, 10.0) * present
        return out

    def _scale(self, name: str) -> tuple[_Array, _Array]:
        count = self._count[name]
        std = np.where(count > 1, np.sqrt(self._m2[name] / np.maximum(count - 1, 1)), 1.0)
        self._scaled[name] = (
            self._mean[name].astype(np.float32),
            np.maximum(std.astype(np.float32), np.float32(1e-3)),
        )
        return self._scaled[name]

    def commit(self) -> None:
        """Fold the queued values into the running statistics."""
        with self._lock:
            if not self._pending:
                return
            pending, self._pending = self._pending, []
            for name, values, present in pending:
                self._update(name, values.astype(np.float64), present.astype(np.float64))
            for name in {name for name, _, _ in pending}:
                self._scale(name)  # ready for the next graph, so normalising costs no statistics work

    def _update(self, name: str, values: _Array, present: _Array) -> None:
        batch_count = present.sum(0)
        if not (batch_count > 0).any():
            return
        batch_mean = (values * present).sum(0) / np.maximum(batch_count, 1)
        batch_m2 = (((values - batch_mean) * present) ** 2).sum(0)
        count, mean, m2 = self._count[name], self._mean[name], self._m2[name]
        total = count + batch_count
        delta = batch_mean - mean
        safe_total = np.maximum(total, 1)
        observed = batch_count > 0
        self._mean[name] = np.where(observed, mean + delta * batch_count / safe_total, mean)
        self._m2[name] = np.where(observed, m2 + batch_m2 + delta**2 * count * batch_count / safe_total, m2)
        self._count[name] = total
        self._updates_since_flush += 1

    def states(self) -> dict[str, NormalizerState]:
        """A snapshot of every node type's statistics (queued values included)."""
        self.commit()
        with self._lock:
            return {
                name: NormalizerState(
                    self._count[name].tolist(), self._mean[name].tolist(), self._m2[name].tolist()
                )
                for name in self._count
            }

    def load_states(self, states: dict[str, NormalizerState]) -> None:
        """Continue from `states()` output (a checkpoint's): the statistics become exactly these, and
        values queued since are discarded (they belong to graphs after that snapshot)."""
        with self._lock:
            self._restore(states)
            self._pending = []
            self._scaled = {}
        self._updates_since_flush = 0

    def flush(self) -> None:
        """Write the statistics to the store; a failure is a `NormalizerWriteError` (never ignored)."""
        if self._store is None:
            return
        states = self.states()
        try:
            self._store.save(states)
        except Exception as exc:
            raise NormalizerWriteError(f"{type(exc).__name__}: {exc}") from exc
        self._updates_since_flush = 0


# ------------------------------------------------------------------------------------------------------
# The builder
# ------------------------------------------------------------------------------------------------------

_LAYER_KINDS = ("linear", "conv")
_SLOT_KINDS = ("mlp", "conv")
_TIERS = (pb.BLUEPRINT_TIER_SAFE, pb.BLUEPRINT_TIER_EXPERIMENTAL, pb.BLUEPRINT_TIER_HIGH_RISK)
_ACTION_INDEX = {action: index for index, action in enumerate(ACTIONS)}
# A seed stage as its one-hot stage columns (see `_STAGE_COLUMNS`); unlisted stages have none set.
_NO_STAGE: tuple[float, ...] = (0.0,) * len(_STAGE_COLUMNS)
_STAGE_ROWS: dict[int, tuple[float, ...]] = {
    code: tuple(float(column == index) for index in range(len(_STAGE_COLUMNS)))
    for column, (_, codes) in enumerate(_STAGE_COLUMNS)
    for code in codes
}
# Presence of a slot's columns after `width_log` when the slot has no seed state.
_ABSENT_STATE: tuple[float, ...] = (0.0,) * 8 + (1.0, 1.0, 1.0) + (0.0,) * len(_STAGE_COLUMNS)


def _log1p(values: list[float]) -> Tensor:
    return torch.log1p(torch.tensor(values, dtype=torch.float32).clamp(min=0.0))


def _one_hot(codes: Tensor, classes: int) -> Tensor:
    """One-hot of `codes` where -1 means "none of the classes" (an all-zero row)."""
    if codes.numel() == 0:
        return torch.zeros((0, classes))
    return torch.nn.functional.one_hot(codes.clamp(min=0), classes).float() * (codes >= 0).float()[:, None]


@dataclass
class _Missing:
    keys: dict[str, set[str]] = field(default_factory=dict)

    def add(self, node_type: str, keys: set[str]) -> None:
        if keys:
            self.keys.setdefault(node_type, set()).update(keys)


@dataclass(frozen=True)
class _Topology:
    """What a graph takes from `packet.topology` alone, computed once per distinct topology.

    A run's layers and slots change only when the host grows, so the validation of the topology, the cap
    on layers and slots, the layer features and the edges among global, layers and slots are reused from
    one decision to the next (keyed by the serialised topology). The tensors are shared by the graphs
    built from it and are read-only.
    """

    key: bytes
    n_layers_all: int
    n_slots_all: int
    layers: list[pb.LayerDescriptor]
    slots: list[pb.SlotDescriptor]
    slot_ids: frozenset[str]  # every slot of the topology (before the caps)
    slot_layer: Tensor  # [kept slots] index of each kept slot's layer
    layer_features: tuple[_Array, _Array]
    edge_index: dict[EdgeKey, Tensor]  # the relations among global, layers and slots
    edge_attr: dict[EdgeKey, Tensor]
    offered: dict[int, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)  # n_bps -> see _offered


class GraphBuilder:
    """Builds `TamiyoGraph`s from packets under one schema, one set of caps and one normaliser."""

    def __init__(
        self,
        settings: TamiyoSettings,
        *,
        schema: GraphSchema = TAMIYO_SCHEMA,
        normalizer_store: NormalizerStore | None = None,
        blueprint_metadata: BlueprintLookup | None = None,
    ) -> None:
        if schema.type_names != TAMIYO_SCHEMA.type_names or schema.relations != TAMIYO_SCHEMA.relations:
            # The feature code below fills exactly TAMIYO_SCHEMA; another schema needs another builder.
            raise GraphSchemaError(
                "builder", f"this builder fills {TAMIYO_SCHEMA.version}, got {schema.version}"
            )
        self.schema = schema
        self._strict = settings.strict_graph
        self._max_layers = settings.max_layers
        self._max_slots = settings.max_seeds
        self._max_blueprints = settings.max_blueprints
        self._metadata = blueprint_metadata
        self.normalizer = FeatureNormalizer(schema, normalizer_store, settings.normalizer_flush_every)
        self._topology: _Topology | None = None

    def _topology_of(self, packet: pb.SystemStatePacket) -> _Topology:
        """The validated, capped topology of `packet`: the cached one when the topology is unchanged."""
        key = packet.topology.SerializeToString(deterministic=True)
        cached = self._topology
        if cached is not None and cached.key == key:
            return cached
        layers_all = list(packet.topology.layers)
        slots_all = list(packet.topology.slots)
        layer_ids_all = [layer.layer_id for layer in layers_all]
        self._check_unique("topology.layers", layer_ids_all)
        self._check_unique("topology.slots", [slot.slot_id for slot in slots_all])
        layer_set = set(layer_ids_all)
        for slot in slots_all:
            if slot.layer_id not in layer_set:
                raise GraphSchemaError(
                    f"slot {slot.slot_id!r}", f"layer {slot.layer_id!r} is not in the topology"
                )
        # Caps: nodes first, then every edge is built from the kept nodes only.
        layers = layers_all[: self._max_layers]
        kept_layers = {layer.layer_id: index for index, layer in enumerate(layers)}
        slots_on_kept = [slot for slot in slots_all if slot.layer_id in kept_layers]
        slots = slots_on_kept[: self._max_slots]
        slot_layer = torch.tensor([kept_layers[slot.layer_id] for slot in slots], dtype=torch.long)
        edge_index, edge_attr = self._topology_edges(layers, slots, slot_layer)
        topology = _Topology(
            key=key,
            n_layers_all=len(layers_all),
            n_slots_all=len(slots_all),
            layers=layers,
            slots=slots,
            slot_ids=frozenset(slot.slot_id for slot in slots_all),
            slot_layer=slot_layer,
            layer_features=self._layer_features(layers, slot_layer),
            edge_index=edge_index,
            edge_attr=edge_attr,
        )
        self._topology = topology
        return topology

    def build(self, packet: pb.SystemStatePacket, *, update_stats: bool = True) -> TamiyoGraph:
        """The graph of `packet`; raises `GraphSchemaError` when the packet does not fit the schema."""
        self.normalizer.commit()  # earlier graphs' values, unless the service already folded them in
        missing = _Missing()
        topology = self._topology_of(packet)
        blueprints_all = list(packet.blueprint_ids)
        self._check_unique("blueprint_ids", blueprints_all)
        states: dict[str, pb.SeedState] = {}
        for state in packet.seed_states:
            if state.slot_id not in topology.slot_ids:
                raise GraphSchemaError(
                    f"seed {state.seed_id!r}", f"slot {state.slot_id!r} is not in the topology"
                )
            if state.slot_id in states:
                raise GraphSchemaError(f"slot {state.slot_id!r}", "has more than one seed state")
            states[state.slot_id] = state

        layers, slots = topology.layers, topology.slots
        blueprints = blueprints_all[: self._max_blueprints]
        dropped_nodes = {
            "layer": topology.n_layers_all - len(layers),
            "slot": topology.n_slots_all - len(slots),
            "blueprint": len(blueprints_all) - len(blueprints),
        }
        slot_states = [states.get(slot.slot_id) for slot in slots]
        missing_states = [
            slot.slot_id for slot, state in zip(slots, slot_states, strict=True) if state is None
        ]
        if missing_states:
            missing.add("slot", {f"seed_state[{sid}]" for sid in missing_states})

        # Per-slot facts as plain lists; features are NumPy arrays until the graph's tensors are made.
        stages = [s.stage if s is not None else 0 for s in slot_states]
        active = [stage in ACTIVE_STAGES for stage in stages]
        bp_index = {bid: index for index, bid in enumerate(blueprints)}
        slot_bp = [bp_index.get(s.blueprint_id, -1) if s is not None else -1 for s in slot_states]

        raw: dict[str, tuple[_Array, _Array]] = {
            "global": self._global_features(
                packet,
                n_layers=len(layers),
                n_slots=len(slots),
                n_blueprints=len(blueprints),
                active_fraction=sum(active) / len(active) if active else 0.0,
                missing=missing,
            ),
            "layer": topology.layer_features,
            "slot": self._slot_features(slots, slot_states, active, missing),
            "blueprint": self._blueprint_features(blueprints, slot_bp, active, missing),
        }
        if missing.keys and self._strict:
            raise MissingFeatureError({k: tuple(sorted(v)) for k, v in missing.keys.items()})

        x: dict[str, Tensor] = {}
        mask: dict[str, Tensor] = {}
        present_fraction: dict[str, float] = {}
        normalized_with: dict[str, NormalizerState] = {}
        for spec in self.schema.node_types:
            values, present = raw[spec.name]
            width = len(spec.continuous)
            normed = self.normalizer.normalize_array(
                spec.name, values[:, :width], present[:, :width], update=update_stats, used=normalized_with
            )
            x[spec.name] = torch.from_numpy(
                np.concatenate([normed, values[:, width:] * present[:, width:]], axis=1, dtype=np.float32)
            )
            mask[spec.name] = torch.from_numpy(present)
            present_fraction[spec.name] = float(present.mean()) if present.size else 1.0

        edge_index, edge_attr = self._edges(topology, len(blueprints), slot_bp)
        full_edges = {
            "layer__feeds__layer": max(topology.n_layers_all - 1, 0) - max(len(layers) - 1, 0),
            "layer__hosts__slot": topology.n_slots_all - len(slots),
            "blueprint__offered_to__slot": topology.n_slots_all * len(blueprints_all)
            - len(slots) * len(blueprints),
        }
        dropped_edges = {
            **full_edges,
            "slot__attaches__layer": full_edges["layer__hosts__slot"],
            "slot__considers__blueprint": full_edges["blueprint__offered_to__slot"],
            "global__conditions__layer": dropped_nodes["layer"],
            "layer__summarises__global": dropped_nodes["layer"],
        }
        unlinked: dict[str, str] = {}
        for slot, state, is_active, index in zip(slots, slot_states, active, slot_bp, strict=True):
            if state is None or not is_active or index >= 0:
                continue
            if not state.blueprint_id:
                unlinked[slot.slot_id] = f"seed {state.seed_id!r} names no blueprint"
            elif state.blueprint_id in blueprints_all:
                unlinked[slot.slot_id] = f"blueprint {state.blueprint_id!r} was cut by the blueprint cap"
            else:
                unlinked[slot.slot_id] = f"blueprint {state.blueprint_id!r} is not offered by the packet"
        coverage = GraphCoverage(
            present_fraction=present_fraction,
            missing={k: tuple(sorted(v)) for k, v in sorted(missing.keys.items())},
            dropped_nodes=dropped_nodes,
            dropped_edges=dropped_edges,
            unlinked_seeds=unlinked,
        )
        action_mask, slot_action_mask = self._legality(stages, active, slot_states, len(blueprints))
        return TamiyoGraph(
            x=x,
            mask=mask,
            edge_index=edge_index,
            edge_attr=edge_attr,
            batch={name: torch.zeros(x[name].shape[0], dtype=torch.long) for name in x},
            num_graphs=1,
            action_mask=action_mask,
            slot_action_mask=slot_action_mask,
            slot_ids=tuple(slot.slot_id for slot in slots),
            seed_ids=tuple(s.seed_id if s is not None else "" for s in slot_states),
            blueprint_ids=tuple(blueprints),
            coverage=coverage,
            normalized_with=normalized_with,
        )

    @staticmethod
    def _check_unique(where: str, ids: list[str]) -> None:
        if len(set(ids)) != len(ids):
            duplicates = sorted({i for i in ids if ids.count(i) > 1})
            raise GraphSchemaError(where, f"duplicate ids {duplicates}")
        if any(not i for i in ids):
            raise GraphSchemaError(where, "an id is empty")

    def _global_features(
        self,
        packet: pb.SystemStatePacket,
        *,
        n_layers: int,
        n_slots: int,
        n_blueprints: int,
        active_fraction: float,
        missing: _Missing,
    ) -> tuple[_Array, _Array]:
        spec = self.schema.node("global")
        values = [
            math.log1p(packet.current_epoch),
            math.log1p(packet.global_step),
            packet.validation_loss,
            packet.validation_accuracy,
            packet.training_loss,
            packet.validation_loss - packet.training_loss,
            math.log1p(n_layers),
            math.log1p(n_slots),
            math.log1p(n_blueprints),
            active_fraction,
        ]
        present = [1.0] * len(values)
        absent: set[str] = set()
        hardware = packet.hardware_context
        if packet.HasField("hardware_context") and hardware.total_memory_gb > 0:
            values += [
                hardware.available_memory_gb / hardware.total_memory_gb,
                hardware.utilization_percent / 100.0,
                hardware.temperature_celsius / 100.0,
            ]
            present += [1.0, 1.0, 1.0]
        else:
            values += [0.0, 0.0, 0.0]
            present += [0.0, 0.0, 0.0]
            absent |= {"hardware_context"}
        for key in GLOBAL_METRIC_KEYS:
            if key in packet.training_metrics:
                values.append(packet.training_metrics[key])
                present.append(1.0)
            else:
                values.append(0.0)
                present.append(0.0)
                absent.add(f"training_metrics[{key}]")
        missing.add("global", absent)
        row = np.array([values], dtype=np.float32)
        if row.shape[1] != spec.dim:
            raise GraphSchemaError("global", f"built {row.shape[1]} features, schema declares {spec.dim}")
        return np.nan_to_num(row), np.array([present], dtype=np.float32)

    @staticmethod
    def _layer_features(layers: list[pb.LayerDescriptor], slot_layer: Tensor) -> tuple[_Array, _Array]:
        count = len(layers)
        widths = _log1p([layer.width for layer in layers])
        depths = torch.tensor([layer.depth for layer in layers], dtype=torch.float32)
        depth_frac = depths / depths.max().clamp(min=1.0) if count else depths
        params = _log1p([layer.parameter_count for layer in layers])
        slot_count = torch.bincount(slot_layer, minlength=count).float()[:count]
        kinds = torch.tensor(
            [_LAYER_KINDS.index(k) if (k := layer.kind.lower()) in _LAYER_KINDS else 2 for layer in layers],
            dtype=torch.long,
        )
        values = torch.cat(
            [
                torch.stack([widths, depth_frac, params, slot_count], dim=1).reshape(count, 4),
                _one_hot(kinds, 3),
            ],
            dim=1,
        ).numpy()
        return values, np.ones_like(values)

    def _slot_features(
        self,
        slots: list[pb.SlotDescriptor],
        states: list[pb.SeedState | None],
        active: list[bool],
        missing: _Missing,
    ) -> tuple[_Array, _Array]:
        # One pass over the slots in plain Python floats and one array at the end: a few dozen values per
        # slot cost less as list entries than as the ~60 small tensor operations of a column-wise build.
        stage_width = len(_STAGE_COLUMNS)
        value_rows: list[list[float]] = []
        present_rows: list[list[float]] = []
        absent: set[str] = set()
        for slot, state, is_active in zip(slots, states, active, strict=True):
            kind = slot.kind.lower()
            kinds = [float(kind == _SLOT_KINDS[0]), float(kind == _SLOT_KINDS[1])]
            width = math.log1p(max(float(slot.width), 0.0))
            if state is None:
                value_rows.append([width, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, *kinds, 0.0, *_NO_STAGE])
                present_rows.append([1.0, *_ABSENT_STATE])
                continue
            metrics = state.metrics
            found = [key in metrics for key in SEED_METRIC_KEYS]
            value = [metrics[key] if ok else 0.0 for key, ok in zip(SEED_METRIC_KEYS, found, strict=True)]
            if is_active and not all(found):
                # Metrics are expected only from active seeds; a dormant slot has none and is not "missing".
                absent.update(
                    f"seed_metrics[{key}]@{slot.slot_id}"
                    for key, ok in zip(SEED_METRIC_KEYS, found, strict=True)
                    if not ok
                )
            value_rows.append(
                [
                    width,
                    math.log1p(abs(state.gradient_norm)),
                    state.learning_rate,
                    math.log1p(max(float(state.age_epochs), 0.0)),
                    state.risk_score,
                    value[0],
                    value[1] / max(value[2], 1.0),
                    value[3],
                    value[4],
                    *kinds,
                    1.0,
                    *_STAGE_ROWS.get(state.stage, _NO_STAGE),
                ]
            )
            present_rows.append(
                [
                    1.0,
                    1.0,
                    1.0,
                    1.0,
                    1.0,
                    float(found[0]),
                    float(found[1] and found[2]),
                    float(found[3]),
                    float(found[4]),
                    1.0,
                    1.0,
                    1.0,
                    *([1.0] * stage_width),
                ]
            )
        missing.add("slot", absent)
        dim = self.schema.node("slot").dim
        values = np.array(value_rows, dtype=np.float32).reshape(len(slots), dim)
        present = np.array(present_rows, dtype=np.float32).reshape(len(slots), dim)
        return np.nan_to_num(values), present

    def _blueprint_features(
        self, blueprints: list[str], slot_bp: list[int], active: list[bool], missing: _Missing
    ) -> tuple[_Array, _Array]:
        count = len(blueprints)
        in_use = [0.0] * count
        for index, is_active in zip(slot_bp, active, strict=True):
            if is_active and index >= 0:
                in_use[index] += 1.0
        value_rows: list[list[float]] = []
        present_rows: list[list[float]] = []
        unknown: set[str] = set()
        for bid, used in zip(blueprints, in_use, strict=True):
            descriptor = self._metadata(bid) if self._metadata is not None else None
            if descriptor is None:
                unknown.add(f"descriptor[{bid}]")
                value_rows.append([used, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
                present_rows.append([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
                continue
            tier = descriptor.tier
            hosts = descriptor.host_kinds
            value_rows.append(
                [
                    used,
                    descriptor.risk,
                    float(descriptor.stage),
                    *(float(tier == known) for known in _TIERS),
                    float(bool(descriptor.quarantine)),
                    *(float(kind in hosts) for kind in _SLOT_KINDS),
                ]
            )
            present_rows.append([1.0] * 9)
        missing.add("blueprint", unknown)
        values = np.array(value_rows, dtype=np.float32).reshape(count, 9)
        present = np.array(present_rows, dtype=np.float32).reshape(count, 9)
        return values, present

    @staticmethod
    def _topology_edges(
        layers: list[pb.LayerDescriptor], slots: list[pb.SlotDescriptor], slot_layer: Tensor
    ) -> tuple[dict[EdgeKey, Tensor], dict[EdgeKey, Tensor]]:
        """The relations among global, layers and slots (they depend on the topology only)."""
        n_layers, n_slots = len(layers), len(slots)
        layer_range = torch.arange(n_layers)
        depth = torch.tensor([layer.depth for layer in layers], dtype=torch.float32)
        order = torch.argsort(depth, stable=True)
        feeds = (
            torch.stack([order[:-1], order[1:]]) if n_layers > 1 else torch.zeros((2, 0), dtype=torch.long)
        )
        depth_gap = (depth[feeds[1]] - depth[feeds[0]])[:, None]
        layer_width = torch.tensor([max(layer.width, 1) for layer in layers], dtype=torch.float32)
        slot_width = torch.tensor([slot.width for slot in slots], dtype=torch.float32)
        width_ratio = (slot_width / layer_width[slot_layer])[:, None] if n_slots else torch.zeros((0, 1))
        hosts = torch.stack([slot_layer, torch.arange(n_slots)]).reshape(2, n_slots)
        zeros_to_global = torch.zeros(n_layers, dtype=torch.long)
        edge_index: dict[EdgeKey, Tensor] = {
            ("global", "conditions", "layer"): torch.stack([zeros_to_global, layer_range]),
            ("layer", "summarises", "global"): torch.stack([layer_range, zeros_to_global]),
            ("layer", "feeds", "layer"): feeds,
            ("layer", "hosts", "slot"): hosts,
            ("slot", "attaches", "layer"): hosts.flip(0),
        }
        edge_attr: dict[EdgeKey, Tensor] = {
            ("layer", "feeds", "layer"): depth_gap.reshape(-1, 1),
            ("layer", "hosts", "slot"): width_ratio.reshape(-1, 1),
            ("slot", "attaches", "layer"): width_ratio.reshape(-1, 1),
        }
        return edge_index, edge_attr

    @staticmethod
    def _offered(topology: _Topology, n_bps: int) -> tuple[Tensor, Tensor, Tensor]:
        """Every offered blueprint is a candidate for every slot: the complete bipartite relation
        (blueprint -> slot edges, their reverse, and the slot index of each edge); cached per count."""
        cached = topology.offered.get(n_bps)
        if cached is None:
            n_slots = len(topology.slots)
            bp_src = torch.arange(n_bps).repeat_interleave(n_slots)
            slot_dst = torch.arange(n_slots).repeat(n_bps)
            offered = torch.stack([bp_src, slot_dst]).reshape(2, n_bps * n_slots)
            cached = topology.offered[n_bps] = (offered, offered.flip(0), slot_dst)
        return cached

    def _edges(
        self, topology: _Topology, n_bps: int, slot_bp: list[int]
    ) -> tuple[dict[EdgeKey, Tensor], dict[EdgeKey, Tensor]]:
        offered, considers, slot_dst = self._offered(topology, n_bps)
        used = np.array(slot_bp, dtype=np.int64).reshape(-1)
        in_use = torch.from_numpy(
            (used[slot_dst.numpy()] == offered[0].numpy()).astype(np.float32).reshape(-1, 1)
        )
        edge_index = {
            **topology.edge_index,
            ("blueprint", "offered_to", "slot"): offered,
            ("slot", "considers", "blueprint"): considers,
        }
        edge_attr = {
            **topology.edge_attr,
            ("blueprint", "offered_to", "slot"): in_use,
            ("slot", "considers", "blueprint"): in_use,
        }
        return edge_index, edge_attr

    @staticmethod
    def _legality(
        stages: list[int], active: list[bool], states: list[pb.SeedState | None], n_blueprints: int
    ) -> tuple[Tensor, Tensor]:
        slot_mask = np.zeros((len(stages), len(ACTIONS)), dtype=np.bool_)
        stage = np.array(stages, dtype=np.int64).reshape(-1)
        has_state = np.array([s is not None for s in states], dtype=np.bool_).reshape(-1)
        slot_mask[:, _ACTION_INDEX[pb.POLICY_ACTION_GERMINATE]] = (
            (stage == pb.SEED_STAGE_DORMANT) & has_state & (n_blueprints > 0)
        )
        slot_mask[:, _ACTION_INDEX[pb.POLICY_ACTION_FOSSILIZE]] = stage == pb.SEED_STAGE_PROBATIONARY
        slot_mask[:, _ACTION_INDEX[pb.POLICY_ACTION_CULL]] = np.array(active, dtype=np.bool_).reshape(-1)
        action_mask = np.zeros((1, len(ACTIONS)), dtype=np.bool_)
        action_mask[0] = slot_mask.any(axis=0)
        for action in (pb.POLICY_ACTION_WAIT, pb.POLICY_ACTION_ADJUST_LR, pb.POLICY_ACTION_PAUSE):
            action_mask[0, _ACTION_INDEX[action]] = True
        return torch.from_numpy(action_mask), torch.from_numpy(slot_mask)
