# Over 500 lines: one builder, whose steps share the cached topology and the normaliser.
"""The graph builder: a `SystemStatePacket` becomes a `TamiyoGraph` under `TAMIYO_SCHEMA`.

A packet that does not fit is refused: a slot on an unknown layer, a seed on an unknown slot, a duplicate
id. Missing values are zeroed and recorded, in a presence mask and in `GraphCoverage`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from esper.leyline import pb
from esper.tamiyo.model.budget import deepen_cost, growth_room, widen_unit_cost
from esper.tamiyo.model.graph import GraphCoverage, TamiyoGraph
from esper.tamiyo.model.heuristic import DEEPEN, ENDED_STAGES, WIDEN, growth_layer
from esper.tamiyo.model.normalizer import FeatureNormalizer
from esper.tamiyo.model.normalizer_state import NormalizerState, NormalizerStore
from esper.tamiyo.model.proposal import ACTIONS, WIDEN_UNITS
from esper.tamiyo.model.schema import (
    ACTIVE_STAGES,
    GLOBAL_METRIC_KEYS,
    LAYER_GROWTH_FEATURES,
    SEED_METRIC_KEYS,
    STAGE_COLUMNS,
    TAMIYO_SCHEMA,
    BlueprintLookup,
    EdgeKey,
    FloatArray,
    GraphSchema,
    GraphSchemaError,
    GrowthOperationLookup,
    MissingFeatureError,
)
from esper.urza import growth_operation

if TYPE_CHECKING:
    from esper.tamiyo.settings import TamiyoSettings

_LAYER_KINDS = ("linear", "conv")
_SLOT_KINDS = ("mlp", "conv")
_TIERS = (pb.BLUEPRINT_TIER_SAFE, pb.BLUEPRINT_TIER_EXPERIMENTAL, pb.BLUEPRINT_TIER_HIGH_RISK)
_ACTION_INDEX = {action: index for index, action in enumerate(ACTIONS)}
# A seed stage as its one-hot stage columns (see `STAGE_COLUMNS`); unlisted stages have none set.
_NO_STAGE: tuple[float, ...] = (0.0,) * len(STAGE_COLUMNS)
_STAGE_ROWS: dict[int, tuple[float, ...]] = {
    code: tuple(float(column == index) for index in range(len(STAGE_COLUMNS)))
    for column, (_, codes) in enumerate(STAGE_COLUMNS)
    for code in codes
}
# Presence of a slot's columns after `width_log` when the slot has no seed state.
_ABSENT_STATE: tuple[float, ...] = (0.0,) * 8 + (1.0, 1.0, 1.0) + (0.0,) * len(STAGE_COLUMNS)


def _is_growth(state: pb.SeedState) -> bool:
    """A growth's state (Kasmina reports it with its id as slot and seed id, and "widen"/"deepen")."""
    return state.blueprint_id in (WIDEN, DEEPEN) and state.seed_id == state.slot_id


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


# A packet's growth view of the layers: (layer_action_mask, widen_amount_mask), the layer rows (values,
# presence), and which actions some layer allows.
_GrowthRows = tuple[tuple[Tensor, Tensor], tuple[FloatArray, FloatArray], FloatArray]


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
    layer_features: tuple[FloatArray, FloatArray]
    edge_index: dict[EdgeKey, Tensor]  # the relations among global, layers and slots
    edge_attr: dict[EdgeKey, Tensor]
    offered: dict[int, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)  # n_bps -> see _offered
    # Growth, per kept layer: whether the host and the catalogue allow a WIDEN / DEEPEN there, and what
    # one widened unit and one deepen cost in parameters (NaN: the topology does not say).
    can_widen: FloatArray = field(default_factory=lambda: np.zeros(0, dtype=np.bool_))
    can_deepen: FloatArray = field(default_factory=lambda: np.zeros(0, dtype=np.bool_))
    unit_cost: FloatArray = field(default_factory=lambda: np.zeros(0))
    deepen_cost: FloatArray = field(default_factory=lambda: np.zeros(0))
    units_allowed: FloatArray = field(default_factory=lambda: np.zeros(0, dtype=np.bool_))  # [WIDEN_UNITS]
    # This topology with slot nodes for growths, by the growths (see `_with_growths`).
    with_growths: dict[tuple[object, ...], _Topology] = field(default_factory=dict)
    # What the growth state, the budget and the active seeds make of the layers (see `_growth_of`).
    growth: dict[tuple[object, ...], _GrowthRows] = field(default_factory=dict)


class GraphBuilder:
    """Builds `TamiyoGraph`s from packets under one schema, one set of caps and one normaliser.

    `blueprint_metadata` describes the offered blueprints; `growth_operations` the growth operations
    (Urza's `op:widen` / `op:deepen` descriptors: host kinds and allowed amounts; None: the host's
    `growth_operations` and the settings alone decide)."""

    def __init__(
        self,
        settings: TamiyoSettings,
        *,
        schema: GraphSchema = TAMIYO_SCHEMA,
        normalizer_store: NormalizerStore | None = None,
        blueprint_metadata: BlueprintLookup | None = None,
        growth_operations: GrowthOperationLookup | None = growth_operation,
    ) -> None:
        if schema.type_names != TAMIYO_SCHEMA.type_names or schema.relations != TAMIYO_SCHEMA.relations:
            # The feature code below fills exactly TAMIYO_SCHEMA; another schema needs another builder.
            raise GraphSchemaError(
                "builder", f"this builder fills {TAMIYO_SCHEMA.version}, got {schema.version}"
            )
        self.schema = schema
        self._strict = settings.strict_graph
        self._lifecycle_only = settings.lifecycle_actions_only
        self._max_layers = settings.max_layers
        self._max_slots = settings.max_seeds
        self._max_blueprints = settings.max_blueprints
        self._metadata = blueprint_metadata
        self._operations = growth_operations
        self._widen_units = np.array(WIDEN_UNITS, dtype=np.float64)
        self._units_allowed = np.array([u in settings.gnn_widen_units for u in WIDEN_UNITS], dtype=np.bool_)
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
        growth = self._growth_sites(packet.topology, layers_all, len(layers))
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
            can_widen=growth[0],
            can_deepen=growth[1],
            unit_cost=growth[2],
            deepen_cost=growth[3],
            units_allowed=growth[4],
        )
        self._topology = topology
        return topology

    def _growth_sites(
        self, topology: pb.HostTopology, layers_all: list[pb.LayerDescriptor], count: int
    ) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray, FloatArray]:
        """Per kept layer: WIDEN allowed, DEEPEN allowed (by the host's `growth_operations` and, with a
        catalogue, the operation's host kinds), one unit's and one deepen's cost; and which amounts a
        WIDEN may take (the settings', within the catalogue's allowed amounts)."""
        widen = self._operations("op:widen") if self._operations is not None else None
        deepen = self._operations("op:deepen") if self._operations is not None else None
        units_allowed = self._units_allowed.copy()
        if widen is not None:
            units_allowed &= np.array([u in widen.allowed_amounts for u in WIDEN_UNITS], dtype=np.bool_)
        can_widen = np.zeros(count, dtype=np.bool_)
        can_deepen = np.zeros(count, dtype=np.bool_)
        unit_cost = np.full(count, np.nan)
        deepen_params = np.full(count, np.nan)
        for index, layer in enumerate(layers_all[:count]):
            operations = layer.growth_operations
            if pb.SEED_OP_WIDEN in operations and (widen is None or layer.kind in widen.host_kinds):
                cost, _ = widen_unit_cost(layers_all, index)
                if cost is not None:
                    can_widen[index] = True
                    unit_cost[index] = cost
            if pb.SEED_OP_DEEPEN in operations and (deepen is None or layer.kind in deepen.host_kinds):
                cost, _ = deepen_cost(topology, layer.layer_id)
                if cost is not None:
                    can_deepen[index] = True
                    deepen_params[index] = cost
        return can_widen, can_deepen, unit_cost, deepen_params, units_allowed

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
        topology = self._with_growths(packet, topology, states)

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

        growth_masks, layer_rows, growth_legal = self._growth_of(packet, topology, active)
        raw: dict[str, tuple[FloatArray, FloatArray]] = {
            "global": self._global_features(
                packet,
                n_layers=len(layers),
                n_slots=len(slots),
                n_blueprints=len(blueprints),
                active_fraction=sum(active) / len(active) if active else 0.0,
                missing=missing,
            ),
            "layer": layer_rows,
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
            if state is None or not is_active or index >= 0 or _is_growth(state):
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
        action_mask, slot_action_mask = self._legality(
            stages, active, slot_states, len(blueprints), growth_legal
        )
        if self._lifecycle_only:
            action_mask[
                0, [_ACTION_INDEX[pb.POLICY_ACTION_ADJUST_LR], _ACTION_INDEX[pb.POLICY_ACTION_PAUSE]]
            ] = False
        layer_action_mask, widen_amount_mask = growth_masks
        return TamiyoGraph(
            x=x,
            mask=mask,
            edge_index=edge_index,
            edge_attr=edge_attr,
            batch={name: torch.zeros(x[name].shape[0], dtype=torch.long) for name in x},
            num_graphs=1,
            action_mask=action_mask,
            slot_action_mask=slot_action_mask,
            layer_action_mask=layer_action_mask,
            widen_amount_mask=widen_amount_mask,
            layer_ids=tuple(layer.layer_id for layer in layers),
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
    ) -> tuple[FloatArray, FloatArray]:
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
            # A device named without its memory was left unmeasured on purpose (Tolaria's
            # `hardware_context=False`): the graph reads it as absent, and it is no missing feature.
            if not (packet.HasField("hardware_context") and hardware.device_type):
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
    def _layer_features(
        layers: list[pb.LayerDescriptor], slot_layer: Tensor
    ) -> tuple[FloatArray, FloatArray]:
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

    def _with_growths(
        self, packet: pb.SystemStatePacket, topology: _Topology, states: dict[str, pb.SeedState]
    ) -> _Topology:
        """`topology` with a slot node for each growth Kasmina reports (on its layer, under the slot cap),
        whose state is the growth's: the slot head's FOSSILIZE and CULL then apply to growths as to seeds
        (the command factory turns them into growth commands). Adds the growths' states to `states`."""
        kept = {layer.layer_id: index for index, layer in enumerate(topology.layers)}
        room = self._max_slots - len(topology.slots)
        added: list[tuple[pb.SlotDescriptor, int]] = []
        for state in packet.growth_states:
            layer = kept.get(growth_layer(state.slot_id))
            if layer is None or state.stage in ENDED_STAGES:
                continue
            if state.slot_id in topology.slot_ids or state.slot_id in states:
                raise GraphSchemaError(f"growth {state.slot_id!r}", "has the id of a slot or another growth")
            states[state.slot_id] = state
            if len(added) < room:
                width = int(state.metrics.get("units", 0.0)) or int(topology.layers[layer].width)
                descriptor = pb.SlotDescriptor(
                    slot_id=state.slot_id, layer_id=topology.layers[layer].layer_id, width=width
                )
                added.append((descriptor, layer))
        if not added:
            return topology
        key = tuple((slot.slot_id, slot.width) for slot, _ in added)
        cached = topology.with_growths.get(key)
        if cached is None:
            slots = [*topology.slots, *(slot for slot, _ in added)]
            slot_layer = torch.cat([topology.slot_layer, torch.tensor([layer for _, layer in added])])
            edge_index, edge_attr = self._topology_edges(topology.layers, slots, slot_layer)
            if len(topology.with_growths) >= 16:
                topology.with_growths.clear()
            cached = topology.with_growths[key] = replace(
                topology,
                n_slots_all=topology.n_slots_all + len(added),
                slots=slots,
                slot_ids=topology.slot_ids | {slot.slot_id for slot, _ in added},
                slot_layer=slot_layer,
                edge_index=edge_index,
                edge_attr=edge_attr,
                offered={},
                growth={},
                with_growths={},
            )
        return cached

    def _growth_of(
        self, packet: pb.SystemStatePacket, topology: _Topology, active: list[bool]
    ) -> _GrowthRows:
        """The growth masks, the layer rows and which actions some layer allows, reused while the growths,
        the budget and the active seeds are those of an earlier packet of this topology (they change only
        when something grows). All are read-only."""
        key = (
            tuple(
                (s.slot_id, s.stage, s.blueprint_id, s.metrics.get("units", 0.0))
                for s in packet.growth_states
            ),
            int(packet.max_parameters),
            growth_room(packet),
            tuple(active),
        )
        cached = topology.growth.get(key)
        if cached is None:
            if len(topology.growth) >= 64:
                topology.growth.clear()
            masks = self._growth_legality(packet, topology, active)
            legal: FloatArray = np.asarray(masks[0].numpy().any(axis=0))
            cached = topology.growth[key] = (masks, self._layer_growth(packet, topology, masks), legal)
        return cached

    def _growth_legality(
        self, packet: pb.SystemStatePacket, topology: _Topology, active: list[bool]
    ) -> tuple[Tensor, Tensor]:
        """`layer_action_mask` [L, actions] (WIDEN and DEEPEN columns) and `widen_amount_mask` [L, units].

        A layer may grow where the host and the catalogue allow it, no unfossilised growth acts on the
        layers it would change (Kasmina's rule: a WIDEN changes the layer and the next one, a DEEPEN the
        layer), (WIDEN) no block was inserted after it and no seed is active on its slots, and the growth
        fits the budget (`growth_room`, the budget module's own test: an unmeasured cost or size never
        fits)."""
        count = len(topology.layers)
        position = {layer.layer_id: index for index, layer in enumerate(topology.layers)}
        touched = np.zeros(count + 1, dtype=np.bool_)  # one spare row: the consumer of the last layer
        blocked = np.zeros(count, dtype=np.bool_)
        for state in packet.growth_states:
            row = position.get(growth_layer(state.slot_id))
            if row is None:
                continue
            if state.blueprint_id == DEEPEN:
                blocked[row] = True  # a block after the layer is built at its width
            if state.stage != pb.SEED_STAGE_FOSSILIZED:
                touched[row] = True
                if state.blueprint_id == WIDEN:
                    touched[row + 1] = True  # a widen changes its layer's consumer too
        widen_free = ~touched[:count] & ~touched[1:] & ~blocked
        deepen_free = ~touched[:count]
        if any(active):
            seeded = np.bincount(
                topology.slot_layer.numpy()[np.array(active, dtype=np.bool_)], minlength=count
            )
            seeded_layer = seeded[:count] > 0
        else:
            seeded_layer = np.zeros(count, dtype=np.bool_)
        room = growth_room(packet)
        with np.errstate(invalid="ignore"):
            amounts = (topology.unit_cost[:, None] * self._widen_units[None, :]) <= room
            deepen_fits = topology.deepen_cost <= room
        widen = (
            (topology.can_widen & widen_free & ~seeded_layer)[:, None]
            & topology.units_allowed[None, :]
            & amounts
        )
        layer_mask = np.zeros((count, len(ACTIONS)), dtype=np.bool_)
        layer_mask[:, _ACTION_INDEX[pb.POLICY_ACTION_WIDEN]] = widen.any(axis=1)
        layer_mask[:, _ACTION_INDEX[pb.POLICY_ACTION_DEEPEN]] = (
            topology.can_deepen & deepen_free & deepen_fits
        )
        return torch.from_numpy(layer_mask), torch.from_numpy(widen.reshape(count, len(WIDEN_UNITS)))

    @staticmethod
    def _live_growth_layers(packet: pb.SystemStatePacket) -> set[str]:
        return {growth_layer(state.slot_id) for state in packet.growth_states if state.stage in ACTIVE_STAGES}

    def _layer_growth(
        self,
        packet: pb.SystemStatePacket,
        topology: _Topology,
        masks: tuple[Tensor, Tensor],
    ) -> tuple[FloatArray, FloatArray]:
        """The layer rows: the topology's columns, this packet's growth columns, the kinds, and whether a
        WIDEN / DEEPEN is legal there now."""
        values, present = topology.layer_features
        count = len(topology.layers)
        index = {layer.layer_id: i for i, layer in enumerate(topology.layers)}
        grown = np.zeros(count)
        live = np.zeros(count)
        deepened = np.zeros(count)
        for state in packet.growth_states:
            row = index.get(growth_layer(state.slot_id))
            if row is None or state.stage in ENDED_STAGES:
                continue
            if state.stage in ACTIVE_STAGES:
                live[row] = 1.0
            if state.blueprint_id == WIDEN:
                grown[row] += max(float(state.metrics.get("units", 0.0)), 0.0)
            elif state.blueprint_id == DEEPEN:
                deepened[row] += 1.0
        budget = float(packet.max_parameters)
        room = growth_room(packet)
        has_budget = budget > 0 and math.isfinite(room)
        left = np.full(count, min(max(room / budget, 0.0), 1.0) if has_budget else 0.0)
        unit_known = has_budget & ~np.isnan(topology.unit_cost)
        unit_frac = np.where(unit_known, np.nan_to_num(topology.unit_cost) / max(budget, 1.0), 0.0)
        growth = np.stack([np.log1p(grown), live, deepened, left, unit_frac], axis=1).reshape(count, 5)
        growth_present = np.stack(
            [np.ones(count), np.ones(count), np.ones(count), np.full(count, float(has_budget)), unit_known],
            axis=1,
        ).reshape(count, 5)
        layer_mask = masks[0].numpy()
        legal = np.stack(
            [
                layer_mask[:, _ACTION_INDEX[pb.POLICY_ACTION_WIDEN]],
                layer_mask[:, _ACTION_INDEX[pb.POLICY_ACTION_DEEPEN]],
            ],
            axis=1,
        ).reshape(count, 2)
        width = 4
        out = np.concatenate([values[:, :width], growth, values[:, width:], legal], axis=1, dtype=np.float32)
        out_present = np.concatenate(
            [present[:, :width], growth_present, present[:, width:], np.ones((count, 2))],
            axis=1,
            dtype=np.float32,
        )
        if out.shape[1] != self.schema.node("layer").dim or len(LAYER_GROWTH_FEATURES) != growth.shape[1]:
            raise GraphSchemaError("layer", f"built {out.shape[1]} features, schema declares the layer node")
        return out, out_present

    def _slot_features(
        self,
        slots: list[pb.SlotDescriptor],
        states: list[pb.SeedState | None],
        active: list[bool],
        missing: _Missing,
    ) -> tuple[FloatArray, FloatArray]:
        # One pass over the slots in plain Python floats and one array at the end: a few dozen values per
        # slot cost less as list entries than as the ~60 small tensor operations of a column-wise build.
        stage_width = len(STAGE_COLUMNS)
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
            if is_active and not all(found) and not _is_growth(state):
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
    ) -> tuple[FloatArray, FloatArray]:
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
        stages: list[int],
        active: list[bool],
        states: list[pb.SeedState | None],
        n_blueprints: int,
        growth_legal: FloatArray,
    ) -> tuple[Tensor, Tensor]:
        slot_mask = np.zeros((len(stages), len(ACTIONS)), dtype=np.bool_)
        stage = np.array(stages, dtype=np.int64).reshape(-1)
        has_state = np.array([s is not None for s in states], dtype=np.bool_).reshape(-1)
        slot_mask[:, _ACTION_INDEX[pb.POLICY_ACTION_GERMINATE]] = (
            (stage == pb.SEED_STAGE_DORMANT) & has_state & (n_blueprints > 0)
        )
        # A growth is fossilised only once Kasmina reports it ready (its gate's verdict), as the heuristic
        # does.
        ready = np.array(
            [s is None or not _is_growth(s) or s.metrics.get("fossilize_ready", 0.0) == 1.0 for s in states],
            dtype=np.bool_,
        ).reshape(-1)
        slot_mask[:, _ACTION_INDEX[pb.POLICY_ACTION_FOSSILIZE]] = (
            stage == pb.SEED_STAGE_PROBATIONARY
        ) & ready
        slot_mask[:, _ACTION_INDEX[pb.POLICY_ACTION_CULL]] = np.array(active, dtype=np.bool_).reshape(-1)
        action_mask = np.zeros((1, len(ACTIONS)), dtype=np.bool_)
        action_mask[0] = slot_mask.any(axis=0) | growth_legal  # WIDEN, DEEPEN: some layer may grow
        for action in (pb.POLICY_ACTION_WAIT, pb.POLICY_ACTION_ADJUST_LR, pb.POLICY_ACTION_PAUSE):
            action_mask[0, _ACTION_INDEX[action]] = True
        return torch.from_numpy(action_mask), torch.from_numpy(slot_mask)
