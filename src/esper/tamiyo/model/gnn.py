"""Tamiyo's heterogeneous GNN: schema-driven encoders, SAGE layers, GAT layers, readout, heads.

How wide and how deep is the `TamiyoGNNConfig`; `POLICY_SIZES` names the sizes a deployment picks from
(`TAMIYO_POLICY_SIZE`), and a checkpoint's header records every size.

Everything the network knows about its input comes from the `GraphSchema`: one encoder per node type,
one convolution per relation. A graph whose node types differ from the schema is refused before any layer
runs, so a new node type can never silently bypass its encoder. Every relation gets edge features in the
GAT layers: a relation without declared features gets a zero column, so `GATConv` never sees
`edge_attr=None`. The device is the device of the module's own parameters.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch_geometric.nn import GATConv, HeteroConv, SAGEConv
from torch_geometric.utils import scatter

from esper.leyline import CONTRACT_VERSION
from esper.tamiyo.model.cudagraph import CapturedForward
from esper.tamiyo.model.dense import (
    DenseKernel,
    DenseRelation,
    DenseRun,
    cached_edge_logits,
    dense_edge_features,
    on_device,
    tensor_version,
    unchanged,
)
from esper.tamiyo.model.graph import TamiyoGraph
from esper.tamiyo.model.outputs import Checkpoint, GNNOutput, no_checkpoint
from esper.tamiyo.model.plan import PLAN_WARM_CALLS, Plan, PlanError, plan_outputs
from esper.tamiyo.model.proposal import ACTIONS, ALPHA_RAMP_STEPS, BLEND_MODES, LR_FACTORS, WIDEN_UNITS
from esper.tamiyo.model.schema import EdgeKey, GraphSchema, GraphSchemaError

# v2: the action head has WIDEN and DEEPEN, with a layer pointer and a widen amount head.
ARCHITECTURE_VERSION = "tamiyo-hetero-gnn-v2"


@dataclass(frozen=True)
class TamiyoGNNConfig:
    """Sizes of the network; the schema decides its node types and relations.

    The defaults are the `default` size of `POLICY_SIZES` (see `sized`)."""

    schema: GraphSchema
    hidden_dim: int = 64
    gat_dim: int = 32
    gat_heads: int = 4
    sage_layers: int = 1
    gat_layers: int = 1

    def __post_init__(self) -> None:
        for name in ("hidden_dim", "gat_dim", "gat_heads", "gat_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.sage_layers < 0:
            raise ValueError(f"sage_layers must be at least 0, got {self.sage_layers}")
        if self.gat_dim % self.gat_heads:
            raise ValueError(f"gat_dim {self.gat_dim} is not divisible by gat_heads {self.gat_heads}")

    @classmethod
    def sized(cls, size: str, schema: GraphSchema) -> TamiyoGNNConfig:
        """The network of a named size (`POLICY_SIZES`) for `schema`."""
        try:
            dims = POLICY_SIZES[size]
        except KeyError:
            raise ValueError(f"unknown policy size {size!r}; known: {', '.join(POLICY_SIZES)}") from None
        return cls(schema=schema, **dims)

    @property
    def size(self) -> str:
        """The name of this network's size in `POLICY_SIZES`, or "custom"."""
        return size_of(self.dims())

    def dims(self) -> dict[str, int]:
        """The sizes alone, as `POLICY_SIZES` lists them."""
        return {name: getattr(self, name) for name in _DIMS}

    def header(self) -> dict[str, str]:
        """What a checkpoint must match to be loaded into this architecture."""
        return {
            "architecture_version": ARCHITECTURE_VERSION,
            "leyline_contract": str(CONTRACT_VERSION),
            "schema_version": self.schema.version,
            "schema_digest": self.schema.digest,
            **{name: str(value) for name, value in self.dims().items()},
        }


_DIMS = ("hidden_dim", "gat_dim", "gat_heads", "sage_layers", "gat_layers")

# Named sizes of the policy network (`TAMIYO_POLICY_SIZE`). `default` is sized to decide within the 5 ms
# step budget on a slow 2-core x86 CPU (benchmarks/tamiyo_latency.py compares it with `full`); `full` is
# the original network, for a GPU.
POLICY_SIZES: dict[str, dict[str, int]] = {
    "default": {"hidden_dim": 64, "gat_dim": 32, "gat_heads": 4, "sage_layers": 1, "gat_layers": 1},
    "full": {"hidden_dim": 256, "gat_dim": 128, "gat_heads": 4, "sage_layers": 2, "gat_layers": 2},
}

# Header fields a checkpoint written before they were recorded lacks, with the value it then had.
LEGACY_HEADER = {"sage_layers": "2", "gat_layers": "2"}


def size_of(dims: dict[str, int]) -> str:
    """The name in `POLICY_SIZES` of a network with these sizes, or "custom"."""
    for name, sizes in POLICY_SIZES.items():
        if sizes == dims:
            return name
    return "custom"


class TamiyoGNN(nn.Module):
    """The policy network. `forward(graph, checkpoint)` calls `checkpoint()` between layers."""

    def __init__(self, config: TamiyoGNNConfig) -> None:
        super().__init__()
        self.config = config
        schema = config.schema
        for required in ("slot", "blueprint", "layer"):
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
        # The same convolution objects, by relation, for the dense inference kernel.
        self._sage_convs: list[dict[EdgeKey, SAGEConv]] = [
            {key: SAGEConv((hidden, hidden), hidden, root_weight=False) for key in self._relations}
            for _ in range(config.sage_layers)
        ]
        self.sage = nn.ModuleList([HeteroConv(dict(convs), aggr="sum") for convs in self._sage_convs])
        # One root transform per node type and layer instead of one per relation: summing k relations'
        # root terms is one linear map, so this is the same family of functions at 1/k of the cost.
        self.sage_root = nn.ModuleList(
            [
                nn.ModuleDict({name: nn.Linear(hidden, hidden) for name in self._types})
                for _ in range(config.sage_layers)
            ]
        )
        per_head = gat // config.gat_heads
        self._gat_convs: list[dict[EdgeKey, GATConv]] = [
            {
                key: GATConv(
                    (width, width),
                    per_head,
                    heads=config.gat_heads,
                    edge_dim=self._edge_dims[key],
                    add_self_loops=False,
                )
                for key in self._relations
            }
            for width in (hidden, *(gat,) * (config.gat_layers - 1))
        ]
        self.gat = nn.ModuleList([HeteroConv(dict(convs), aggr="sum") for convs in self._gat_convs])
        self.gat_skip = nn.ModuleDict({name: nn.Linear(hidden, gat) for name in self._types})
        self.readout = nn.Sequential(nn.Linear(gat * len(self._types), gat), nn.ReLU())
        self.action_head = nn.Linear(gat, len(ACTIONS))
        self.slot_head = nn.Sequential(nn.Linear(2 * gat, gat), nn.ReLU(), nn.Linear(gat, 1))
        self.blueprint_head = nn.Sequential(nn.Linear(2 * gat, gat), nn.ReLU(), nn.Linear(gat, 1))
        self.blend_head = nn.Linear(gat, len(BLEND_MODES))
        self.schedule_head = nn.Linear(gat, len(ALPHA_RAMP_STEPS))
        self.lr_head = nn.Linear(gat, len(LR_FACTORS))
        self.value_head = nn.Linear(gat, 1)
        self.layer_head = nn.Sequential(nn.Linear(2 * gat, gat), nn.ReLU(), nn.Linear(gat, 1))
        self.amount_head = nn.Linear(gat, len(WIDEN_UNITS))
        # Inference without autograd runs the dense kernel (same weights, same function, far fewer ops).
        self.dense_inference = True
        self._kernel = DenseKernel(self._types, self._relations)
        # Per relation: the edges and edge features the cached dense blocks were built from, with the
        # version counters they had then (the builder hands the same tensors while the topology holds).
        self._adjacency_cache: dict[
            EdgeKey, tuple[Tensor, int | None, Tensor, int | None, DenseRelation]
        ] = {}
        self._zero_attr: dict[EdgeKey, Tensor] = {}  # zero features of featureless relations (read-only)
        self._plan: Plan | None = None  # the dense path traced for one topology (`build_plan`)
        self._captured: CapturedForward | None = None  # the dense path in a CUDA graph (`capture_graph`)
        self.capture_misses = 0  # graphs a capture was held for and did not fit

    @property
    def device(self) -> torch.device:
        """Where the parameters live; inputs are moved here, never the other way round.

        Read from the module's own parameters (the first one found), so that a module whose linear layers
        were swapped for quantised ones (no `.weight` tensor) still answers; a module with no parameter
        left is quantised throughout, and quantised kernels run on the CPU."""
        for param in self.parameters():
            return param.device
        return torch.device("cpu")

    def _check(self, graph: TamiyoGraph) -> None:
        if set(graph.x) != set(self._types):
            raise GraphSchemaError(
                "gnn.input", f"node types {sorted(graph.x)} do not match the schema's {sorted(self._types)}"
            )
        unknown = set(graph.edge_index) - set(self._relations)
        if unknown:
            raise GraphSchemaError("gnn.input", f"relations {sorted(unknown)} are not in the schema")
        missing = [key for key in self._relations if key not in graph.edge_index]
        if missing:  # an empty relation is a (2, 0) index, never an absent one
            raise GraphSchemaError(
                "gnn.input", f"relations {missing} of the schema are missing from the graph"
            )

    def edge_attrs(self, graph: TamiyoGraph, device: torch.device) -> dict[EdgeKey, Tensor]:
        """Edge features for every relation: declared ones from the graph, zeros where none exist."""
        attrs: dict[EdgeKey, Tensor] = {}
        for key in self._relations:
            count = graph.edge_index[key].shape[1]
            attr = graph.edge_attr.get(key)
            if attr is None:
                if self._declared_edge_features[key]:
                    raise GraphSchemaError(f"gnn.edge_attr[{key}]", "declared edge features are missing")
                zeros = self._zero_attr.get(key)
                if zeros is None or zeros.shape[0] != count or zeros.device != device:
                    with torch.inference_mode(False):  # a normal tensor: its version is tracked
                        zeros = self._zero_attr[key] = torch.zeros(
                            (count, self._edge_dims[key]), device=device
                        )
                attr = zeros
            if attr.shape != (count, self._edge_dims[key]):
                raise GraphSchemaError(
                    f"gnn.edge_attr[{key}]",
                    f"shape {tuple(attr.shape)}, expected ({count}, {self._edge_dims[key]})",
                )
            attrs[key] = on_device(attr, device)
        return attrs

    def forward(self, graph: TamiyoGraph, checkpoint: Checkpoint = no_checkpoint) -> GNNOutput:
        """Run the network on `graph` (one graph or a batch).

        Without autograd (inference) and with `dense_inference` on, the dense kernel runs; with gradients
        (Simic's training) PyG's message passing does. Both compute the same function of the same weights.
        """
        self._check(graph)
        device = self.device
        edge_attr = self.edge_attrs(graph, device)
        if self.dense_inference and not torch.is_grad_enabled():
            captured = self._capture_for(graph)
            if captured is not None:
                return captured.run(graph, checkpoint)
            plan = self._planned(graph)
            if plan is not None:
                return plan.run(self, graph, edge_attr, checkpoint)
            adjacency = self.dense_adjacency(graph, edge_attr, device)
            if adjacency is not None:
                return self._forward_dense(graph, adjacency, checkpoint)
        return self.forward_message_passing(graph, checkpoint, edge_attr)

    def forward_message_passing(
        self,
        graph: TamiyoGraph,
        checkpoint: Checkpoint = no_checkpoint,
        edge_attr: dict[EdgeKey, Tensor] | None = None,
    ) -> GNNOutput:
        """The network through PyG's `HeteroConv` / `SAGEConv` / `GATConv` (the reference path)."""
        self._check(graph)
        device = self.device
        edge_index = {key: graph.edge_index[key].to(device) for key in self._relations}
        if edge_attr is None:
            edge_attr = self.edge_attrs(graph, device)
        h = self._encode(graph, device)
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
        return self._heads(graph, h, device)

    def dense_adjacency(
        self, graph: TamiyoGraph, edge_attr: dict[EdgeKey, Tensor], device: torch.device
    ) -> dict[EdgeKey, DenseRelation] | None:
        """Each relation as dense [n_dst, n_src] matrices, or None when a relation repeats an edge.

        Tamiyo's graphs have at most a few hundred nodes per type, so dense blocks cost little and turn
        every gather/scatter of message passing into one matrix product. Repeated edges (which message
        passing would count twice) send the caller back to the message-passing path.
        """
        dense: dict[EdgeKey, DenseRelation] = {}
        for key in self._relations:
            src, _, dst = key
            n_src, n_dst = graph.x[src].shape[0], graph.x[dst].shape[0]
            attr_in = edge_attr[key]
            # What the graph holds, where the builder made it (the CPU): compared there, so that a network
            # on a GPU reuses its blocks without a device round trip per decision.
            source_index = graph.edge_index[key]
            source_attr = graph.edge_attr.get(key, attr_in)
            # A run's topology rarely changes between decisions: reuse the blocks of identical edges.
            cached = self._adjacency_cache.get(key)
            if cached is not None:
                old_index, index_version, old_attr, attr_version, blocks = cached
                if (
                    blocks.mask.shape == (n_dst, n_src)
                    and blocks.mask.device == device
                    and unchanged(old_index, index_version, source_index)
                    and unchanged(old_attr, attr_version, source_attr)
                ):
                    dense[key] = blocks
                    continue
            index = on_device(source_index, device)
            count = torch.zeros((n_dst, n_src), device=device)
            count.index_put_((index[1], index[0]), torch.ones(index.shape[1], device=device), accumulate=True)
            if index.shape[1] and bool(count.max() > 1):
                return None
            attr = dense_edge_features(index, attr_in, n_dst, n_src)
            in_degree = count.sum(1, keepdim=True)
            degree = in_degree.clamp(min=1.0)
            mask = count > 0
            log_mask = torch.zeros((1, n_dst, n_src), device=device).masked_fill(~mask[None], float("-inf"))
            dense[key] = DenseRelation(
                mask=mask,
                mean=count / degree,
                attr=attr,
                log_mask=log_mask,
                single=bool(in_degree.max() <= 1) if n_dst else True,
                complete=bool(mask.all()),
                empty_rows=bool((in_degree == 0).any()),
            )
            self._adjacency_cache[key] = (
                source_index,
                tensor_version(source_index),
                source_attr,
                tensor_version(source_attr),
                dense[key],
            )
        return dense

    def _forward_dense(
        self, graph: TamiyoGraph, adjacency: dict[EdgeKey, DenseRelation], checkpoint: Checkpoint
    ) -> GNNOutput:
        run = DenseRun(self, adjacency, cached_edge_logits, checkpoint)
        hs = run.hidden([graph.x[name] for name in self._types], [graph.mask[name] for name in self._types])
        checkpoint()
        hs = run.attend(hs)
        checkpoint()
        if graph.num_graphs != 1:
            return self._heads(graph, dict(zip(self._types, hs, strict=True)), self.device)
        return GNNOutput(*run.heads(hs))

    # -- the per-topology plan ----------------------------------------------------------------------

    def build_plan(self, graph: TamiyoGraph) -> float:
        """Trace and freeze the dense path for `graph`'s topology and the current weights (see `Plan`);
        returns the milliseconds it took. Until the topology or a weight changes, inference on graphs of
        this topology runs the plan. Raises `PlanError` (and keeps no plan) when the graph cannot have one
        or the plan does not compute what the dense path computes on `graph`."""
        start = time.perf_counter()
        self._plan = None
        if graph.num_graphs != 1:
            raise PlanError(f"a plan is built for one graph, got a batch of {graph.num_graphs}")
        self._check(graph)
        device = self.device
        with torch.inference_mode(False), torch.no_grad():
            edge_attr = self.edge_attrs(graph, device)
            adjacency = self.dense_adjacency(graph, edge_attr, device)
            if adjacency is None:
                raise PlanError("a relation repeats an edge: this graph takes the message-passing path")
            plan = Plan.trace(self, graph, adjacency, edge_attr)
            reference = self._forward_dense(graph, adjacency, no_checkpoint)
            for _ in range(PLAN_WARM_CALLS):  # TorchScript's profiling executor settles in the first calls
                planned = plan.run(self, graph, edge_attr, no_checkpoint)
        for name, want, got in zip(
            GNNOutput.__dataclass_fields__, plan_outputs(reference), plan_outputs(planned), strict=True
        ):
            if want.shape != got.shape or not torch.allclose(want, got, rtol=1e-4, atol=1e-4):
                raise PlanError(f"the traced plan disagrees with the dense path on {name}")
        self._plan = plan
        return (time.perf_counter() - start) * 1e3

    def capture_graph(self, graph: TamiyoGraph) -> float:
        """Capture the dense path for `graph`'s topology and the current weights in a CUDA graph (P7, see
        `CapturedForward`); returns the milliseconds it took. Raises `CaptureUnavailable` (and keeps no
        capture) off CUDA or when the graph cannot be captured."""
        start = time.perf_counter()
        self._captured = None
        self._check(graph)
        self._captured = CapturedForward.capture(self, graph)
        return (time.perf_counter() - start) * 1e3

    def drop_capture(self) -> None:
        """Forget the CUDA graph (inference runs the plan or the dense path)."""
        self._captured = None

    @property
    def has_capture(self) -> bool:
        """Whether a CUDA graph is held (replayed only while its topology and weights still hold)."""
        return self._captured is not None

    def _capture_for(self, graph: TamiyoGraph) -> CapturedForward | None:
        captured = self._captured
        if captured is None:
            return None
        if captured.weights != self._kernel._key(self):
            self._captured = None  # the weights moved on: the capture computes an older network
            self.capture_misses += 1
            return None
        if not captured.fits(graph):
            self.capture_misses += 1
            return None
        return captured

    def drop_plan(self) -> None:
        """Forget the plan (inference runs the dense path until `build_plan`)."""
        self._plan = None

    @property
    def has_plan(self) -> bool:
        """Whether a plan is held (it is used only while its topology and weights still hold)."""
        return self._plan is not None

    def _planned(self, graph: TamiyoGraph) -> Plan | None:
        plan = self._plan
        if plan is None or graph.num_graphs != 1 or not plan.fits(graph):
            return None
        if plan.weights != self._kernel._key(self):
            self._plan = None  # the weights moved on: this plan computes an older network
            return None
        return plan

    def _encode(self, graph: TamiyoGraph, device: torch.device) -> dict[str, Tensor]:
        return {
            name: self.encoders[name](torch.cat([graph.x[name], graph.mask[name]], dim=1).to(device))
            for name in self._types
        }

    def _heads(self, graph: TamiyoGraph, h: dict[str, Tensor], device: torch.device) -> GNNOutput:
        slot_h, bp_h, layer_h = h["slot"], h["blueprint"], h["layer"]
        if graph.num_graphs == 1:  # one graph: pooling is a column mean (zeros for an empty node type)
            pooled = [
                h[name].mean(0, keepdim=True) if h[name].shape[0] else h[name].new_zeros(1, h[name].shape[1])
                for name in self._types
            ]
            context = self.readout(torch.cat(pooled, dim=1))
            slot_ctx = context.expand(slot_h.shape[0], -1)
            bp_ctx = context.expand(bp_h.shape[0], -1)
            layer_ctx = context.expand(layer_h.shape[0], -1)
        else:
            batch = {name: graph.batch[name].to(device) for name in self._types}
            size = graph.num_graphs
            pooled = [
                scatter(h[name], batch[name], dim=0, dim_size=size, reduce="mean") for name in self._types
            ]
            context = self.readout(torch.cat(pooled, dim=1))
            slot_ctx = context[batch["slot"]]
            bp_ctx = context[batch["blueprint"]]
            layer_ctx = context[batch["layer"]]
        return GNNOutput(
            action_logits=self.action_head(context),
            slot_scores=self.slot_head(torch.cat([slot_h, slot_ctx], dim=1)).squeeze(-1),
            blueprint_scores=self.blueprint_head(torch.cat([bp_h, bp_ctx], dim=1)).squeeze(-1),
            blend_logits=self.blend_head(context),
            schedule_logits=self.schedule_head(context),
            lr_logits=self.lr_head(context),
            value=self.value_head(context).squeeze(-1),
            layer_scores=self.layer_head(torch.cat([layer_h, layer_ctx], dim=1)).squeeze(-1),
            amount_logits=self.amount_head(context),
        )
