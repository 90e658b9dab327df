"""Tamiyo's heterogeneous GNN: schema-driven encoders, two SAGE layers, two GAT layers, readout, heads.

Everything the network knows about its input comes from the `GraphSchema`: one encoder per node type,
one convolution per relation. A graph whose node types differ from the schema is refused before any layer
runs, so a new node type can never silently bypass its encoder. Every relation gets edge features in the
GAT layers: a relation without declared features gets a zero column, so `GATConv` never sees
`edge_attr=None`. The device is the device of the module's own parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch_geometric.nn import GATConv, HeteroConv, SAGEConv
from torch_geometric.utils import scatter

from esper.tamiyo.graph import EdgeKey, GraphSchema, GraphSchemaError, TamiyoGraph
from esper.tamiyo.proposal import ACTIONS, ALPHA_RAMP_STEPS, BLEND_MODES, LR_FACTORS

ARCHITECTURE_VERSION = "tamiyo-hetero-gnn-v1"


@dataclass(frozen=True)
class TamiyoGNNConfig:
    """Sizes of the network; the schema decides its node types and relations."""

    schema: GraphSchema
    hidden_dim: int = 256
    gat_dim: int = 128
    gat_heads: int = 4

    def __post_init__(self) -> None:
        if self.gat_dim % self.gat_heads:
            raise ValueError(f"gat_dim {self.gat_dim} is not divisible by gat_heads {self.gat_heads}")

    def header(self) -> dict[str, str]:
        """What a checkpoint must match to be loaded into this architecture."""
        return {
            "architecture_version": ARCHITECTURE_VERSION,
            "schema_version": self.schema.version,
            "schema_digest": self.schema.digest,
            "hidden_dim": str(self.hidden_dim),
            "gat_dim": str(self.gat_dim),
            "gat_heads": str(self.gat_heads),
        }


@dataclass(frozen=True)
class GNNOutput:
    """Raw head outputs for a batch of B graphs (slot/blueprint scores are per node)."""

    action_logits: Tensor  # [B, len(ACTIONS)]
    slot_scores: Tensor  # [S]
    blueprint_scores: Tensor  # [P]
    blend_logits: Tensor  # [B, len(BLEND_MODES)]
    schedule_logits: Tensor  # [B, len(ALPHA_RAMP_STEPS)]
    lr_logits: Tensor  # [B, len(LR_FACTORS)]
    value: Tensor  # [B]


Checkpoint = Callable[[], None]


def _no_checkpoint() -> None:
    return None


class TamiyoGNN(nn.Module):
    """The policy network. `forward(graph, checkpoint)` calls `checkpoint()` between layers."""

    def __init__(self, config: TamiyoGNNConfig) -> None:
        super().__init__()
        self.config = config
        schema = config.schema
        for required in ("slot", "blueprint"):
            schema.node(required)  # the choice heads score these node types
        hidden, gat = config.hidden_dim, config.gat_dim
        self._types = schema.type_names
        self._relations: tuple[EdgeKey, ...] = tuple(rel.key for rel in schema.relations)
        self._edge_dims = {rel.key: rel.edge_dim for rel in schema.relations}
        self._declared_edge_features = {rel.key: bool(rel.edge_features) for rel in schema.relations}
        # Input is the features and their presence mask side by side.
        self.encoders = nn.ModuleDict(
            {
                spec.name: nn.Sequential(nn.Linear(2 * spec.dim, hidden), nn.ReLU())
                for spec in schema.node_types
            }
        )
        self.sage = nn.ModuleList(
            [
                HeteroConv(
                    {key: SAGEConv((hidden, hidden), hidden, root_weight=False) for key in self._relations},
                    aggr="sum",
                )
                for _ in range(2)
            ]
        )
        # One root transform per node type and layer instead of one per relation: summing k relations'
        # root terms is one linear map, so this is the same family of functions at 1/k of the cost.
        self.sage_root = nn.ModuleList(
            [nn.ModuleDict({name: nn.Linear(hidden, hidden) for name in self._types}) for _ in range(2)]
        )
        per_head = gat // config.gat_heads
        self.gat = nn.ModuleList(
            [
                HeteroConv(
                    {
                        key: GATConv(
                            (width, width),
                            per_head,
                            heads=config.gat_heads,
                            edge_dim=self._edge_dims[key],
                            add_self_loops=False,
                        )
                        for key in self._relations
                    },
                    aggr="sum",
                )
                for width in (hidden, gat)
            ]
        )
        self.gat_skip = nn.ModuleDict({name: nn.Linear(hidden, gat) for name in self._types})
        self.readout = nn.Sequential(nn.Linear(gat * len(self._types), gat), nn.ReLU())
        self.action_head = nn.Linear(gat, len(ACTIONS))
        self.slot_head = nn.Sequential(nn.Linear(2 * gat, gat), nn.ReLU(), nn.Linear(gat, 1))
        self.blueprint_head = nn.Sequential(nn.Linear(2 * gat, gat), nn.ReLU(), nn.Linear(gat, 1))
        self.blend_head = nn.Linear(gat, len(BLEND_MODES))
        self.schedule_head = nn.Linear(gat, len(ALPHA_RAMP_STEPS))
        self.lr_head = nn.Linear(gat, len(LR_FACTORS))
        self.value_head = nn.Linear(gat, 1)

    @property
    def device(self) -> torch.device:
        """Where the parameters live; inputs are moved here, never the other way round."""
        return self.action_head.weight.device

    def _check(self, graph: TamiyoGraph) -> None:
        if set(graph.x) != set(self._types):
            raise GraphSchemaError(
                "gnn.input", f"node types {sorted(graph.x)} do not match the schema's {sorted(self._types)}"
            )
        unknown = set(graph.edge_index) - set(self._relations)
        if unknown:
            raise GraphSchemaError("gnn.input", f"relations {sorted(unknown)} are not in the schema")

    def edge_attrs(self, graph: TamiyoGraph, device: torch.device) -> dict[EdgeKey, Tensor]:
        """Edge features for every relation: declared ones from the graph, zeros where none exist."""
        attrs: dict[EdgeKey, Tensor] = {}
        for key in self._relations:
            count = graph.edge_index[key].shape[1]
            attr = graph.edge_attr.get(key)
            if attr is None:
                if self._declared_edge_features[key]:
                    raise GraphSchemaError(f"gnn.edge_attr[{key}]", "declared edge features are missing")
                attr = torch.zeros((count, self._edge_dims[key]))
            if attr.shape != (count, self._edge_dims[key]):
                raise GraphSchemaError(
                    f"gnn.edge_attr[{key}]",
                    f"shape {tuple(attr.shape)}, expected ({count}, {self._edge_dims[key]})",
                )
            attrs[key] = attr.to(device)
        return attrs

    def forward(self, graph: TamiyoGraph, checkpoint: Checkpoint = _no_checkpoint) -> GNNOutput:
        """Run the network on `graph` (one graph or a batch)."""
        self._check(graph)
        device = self.device
        edge_index = {key: graph.edge_index[key].to(device) for key in self._relations}
        edge_attr = self.edge_attrs(graph, device)
        h = {
            name: self.encoders[name](torch.cat([graph.x[name], graph.mask[name]], dim=1).to(device))
            for name in self._types
        }
        for conv, root_types in zip(self.sage, self.sage_root, strict=True):
            root: nn.ModuleDict = root_types  # type: ignore[assignment]
            checkpoint()
            out = conv(h, edge_index)
            h = {
                name: torch.relu(root[name](h[name]) + out[name]) + h[name]
                if name in out
                else torch.relu(root[name](h[name])) + h[name]
                for name in self._types
            }
        pre = h
        h = {name: self.gat_skip[name](pre[name]) for name in self._types}
        for index, conv in enumerate(self.gat):
            checkpoint()
            out = conv(pre if index == 0 else h, edge_index, edge_attr_dict=edge_attr)
            h = {
                name: torch.nn.functional.elu(out[name]) + h[name] if name in out else h[name]
                for name in self._types
            }
        checkpoint()
        batch = {name: graph.batch[name].to(device) for name in self._types}
        size = graph.num_graphs
        pooled = [scatter(h[name], batch[name], dim=0, dim_size=size, reduce="mean") for name in self._types]
        context = self.readout(torch.cat(pooled, dim=1))
        slot_h = h["slot"]
        slot_ctx = context[batch["slot"]]
        bp_h = h["blueprint"]
        bp_ctx = context[batch["blueprint"]]
        return GNNOutput(
            action_logits=self.action_head(context),
            slot_scores=self.slot_head(torch.cat([slot_h, slot_ctx], dim=1)).squeeze(-1),
            blueprint_scores=self.blueprint_head(torch.cat([bp_h, bp_ctx], dim=1)).squeeze(-1),
            blend_logits=self.blend_head(context),
            schedule_logits=self.schedule_head(context),
            lr_logits=self.lr_head(context),
            value=self.value_head(context).squeeze(-1),
        )
