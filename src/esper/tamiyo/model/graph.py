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

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from esper.tamiyo.model.normalizer_state import NormalizerState
from esper.tamiyo.model.schema import EdgeKey, GraphSchemaError

if TYPE_CHECKING:
    from torch_geometric.data import HeteroData


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
    `layer_action_mask[l, a]` says whether layer node l is a legal target of action a (WIDEN, DEEPEN);
    `widen_amount_mask[l, k]` whether widening layer l by `WIDEN_UNITS[k]` is legal (settings, catalogue,
    budget).
    """

    x: dict[str, Tensor]
    mask: dict[str, Tensor]
    edge_index: dict[EdgeKey, Tensor]
    edge_attr: dict[EdgeKey, Tensor]
    batch: dict[str, Tensor]
    num_graphs: int
    action_mask: Tensor
    slot_action_mask: Tensor
    layer_action_mask: Tensor
    widen_amount_mask: Tensor
    layer_ids: tuple[str, ...]
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
        data["layer"].action_mask = self.layer_action_mask
        data["layer"].amount_mask = self.widen_amount_mask
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
        layer_action_mask=torch.cat([graph.layer_action_mask for graph in graphs]),
        widen_amount_mask=torch.cat([graph.widen_amount_mask for graph in graphs]),
        layer_ids=tuple(lid for graph in graphs for lid in graph.layer_ids),
        slot_ids=tuple(sid for graph in graphs for sid in graph.slot_ids),
        seed_ids=tuple(sid for graph in graphs for sid in graph.seed_ids),
        blueprint_ids=tuple(bid for graph in graphs for bid in graph.blueprint_ids),
    )
