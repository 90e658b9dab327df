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

import dataclasses
import itertools
import operator
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch_geometric.nn import GATConv, HeteroConv, SAGEConv
from torch_geometric.utils import scatter

from esper.leyline import CONTRACT_VERSION, EsperError
from esper.tamiyo.graph import EdgeKey, GraphSchema, GraphSchemaError, TamiyoGraph
from esper.tamiyo.proposal import ACTIONS, ALPHA_RAMP_STEPS, BLEND_MODES, LR_FACTORS

ARCHITECTURE_VERSION = "tamiyo-hetero-gnn-v1"


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

_VERSION_OF = operator.attrgetter("_version")


@dataclass(frozen=True)
class _DenseRelation:
    """One relation of one graph as dense blocks: edge mask, mean-aggregation weights, edge features.

    `single`: no destination has more than one incoming edge, so GAT's softmax over a destination's edges
    is exactly 1 (or the row is empty) and attention reduces to `mean @ src`. `complete`: every pair is an
    edge (no -inf mask needed). `empty_rows`: some destination has no edge (its softmax row is NaN -> 0).
    `edge_logits` caches the edge term of the attention logits per packed GAT layer (by generation).
    """

    mask: Tensor  # [n_dst, n_src] bool
    mean: Tensor  # [n_dst, n_src]: 1/in-degree where an edge exists
    attr: Tensor  # [n_dst, n_src, edge_dim]
    log_mask: Tensor  # [1, n_dst, n_src]: 0 where an edge exists, -inf elsewhere
    single: bool = False
    complete: bool = False
    empty_rows: bool = True
    edge_logits: dict[int, Tensor] = field(default_factory=dict, compare=False)


def _attention_map(lin: nn.Module, att: Tensor, heads: int, channels: int) -> Tensor:
    """(lin(x).view(H, C) * att).sum(-1) is linear in x: the [in, H] matrix that computes it directly."""
    weight: Tensor = lin.weight  # type: ignore[assignment]
    return (weight.detach().view(heads, channels, -1) * att.detach().view(heads, channels, 1)).sum(1).t()


@dataclass(frozen=True)
class _PackedSage:
    """One SAGE layer's weights, transposed once for `x @ W` products, biases summed per destination.

    Mean aggregation is linear, so `(A @ h_src) @ W = A @ (h_src @ W)`: at run time each relation takes
    the order that multiplies its weight with the smaller of its two node sets (aggregate first when the
    destination has no more rows than the source, project first otherwise). Nothing here depends on that
    choice, so a graph of a new shape never waits for a re-packing.
    """

    root: dict[str, Tensor]  # node type -> [hidden, hidden]
    bias: dict[str, Tensor]  # node type -> root bias + every incoming relation's bias
    relation: dict[EdgeKey, Tensor]  # [hidden, hidden]
    incoming: dict[str, tuple[EdgeKey, ...]]  # node type -> the relations into it


@dataclass(frozen=True)
class _PackedGat:
    """One GAT layer, per node type: every projection of that type's features in one matrix.

    Columns, for node type t: for each relation with source t its source features (H*C) and source
    attention (H); for each relation with destination t its destination attention (H). `slices` says
    where each piece is: (relation, part) -> (type, start, width). `generation` identifies this packing
    (caches derived from it are keyed by it, never by `id`).
    """

    weight: dict[str, Tensor]  # type -> [in, columns]
    slices: dict[tuple[EdgeKey, str], tuple[str, int, int]]
    edge_map: dict[EdgeKey, Tensor]  # [edge_dim, H]
    bias: dict[EdgeKey, Tensor]
    bias_by_type: dict[str, Tensor]  # dst type -> sum of its incoming relations' biases
    generation: int

    def part(self, projected: dict[str, Tensor], rel: EdgeKey, name: str) -> Tensor:
        """Columns `name` ("src", "a_src", "a_dst") of relation `rel` in the projected features."""
        node_type, start, width = self.slices[(rel, name)]
        return projected[node_type].narrow(1, start, width)


@dataclass(frozen=True)
class _PackedHeads:
    """The heads for one graph: every product with the graph context in one matrix.

    Columns of `context_weight`: the slot head's and the blueprint head's first layer on the context half
    of their `[node | context]` input, then the action, blend, schedule, lr and value heads (`splits`).
    """

    context_weight: Tensor  # [gat, columns]
    context_bias: Tensor
    splits: tuple[int, ...]
    slot_node: Tensor  # [gat, gat]: the slot head's first layer on the node half
    slot_out: tuple[Tensor, Tensor]  # last layer weight [gat, 1] and bias
    blueprint_node: Tensor
    blueprint_out: tuple[Tensor, Tensor]


_generations = itertools.count()


class _DenseKernel:
    """Packs the layers' weights for the dense inference path and re-packs when any weight changes.

    The cache key is every parameter's identity and in-place version counter, so `load_state_dict`, an
    optimiser step or `.to(device)` all invalidate it.
    """

    def __init__(self, types: tuple[str, ...], relations: tuple[EdgeKey, ...]) -> None:
        self._types = types
        self._relations = relations
        self._cache: dict[int, tuple[tuple[int, ...], object]] = {}
        # Where each owner's parameters live (module, name), found once: walking the module tree on every
        # decision cost more than the check itself. The slots are read afresh, so a replaced parameter
        # object is still seen.
        self._slots: dict[tuple[int, ...], tuple[list[dict[str, nn.Parameter | None]], list[str]]] = {}

    def _key(self, *modules: nn.Module) -> tuple[int, ...]:
        ident = tuple(id(module) for module in modules)
        slots = self._slots.get(ident)
        if slots is None:
            found = [
                (sub._parameters, name)
                for module in modules
                for sub in module.modules()
                for name, param in sub._parameters.items()
                if param is not None
            ]
            slots = self._slots[ident] = ([owner for owner, _ in found], [name for _, name in found])
        owners, names = slots
        params = list(map(dict.__getitem__, owners, names))
        try:
            versions = tuple(map(_VERSION_OF, params))  # C-level loops: this runs on every decision
        except (RuntimeError, AttributeError):
            # An inference-mode parameter has no version counter (and can only change inside inference
            # mode); a removed one is None.
            versions = tuple(-1 if p is None or p.is_inference() else p._version for p in params)
        return versions + tuple(map(id, params))

    def sage(self, convs: dict[EdgeKey, SAGEConv], root: nn.ModuleDict, owner: nn.Module) -> _PackedSage:
        """The packed weights of one SAGE layer (`owner` holds the convolutions, `root` the root maps)."""
        key = self._key(owner, root)
        cached = self._cache.get(id(owner))
        if cached is not None and cached[0] == key:
            return cached[1]  # type: ignore[return-value]
        roots, bias, incoming = {}, {}, {}
        for name in self._types:
            lin_root: nn.Linear = root[name]  # type: ignore[assignment]
            rels = tuple(rel for rel in self._relations if rel[2] == name)
            total = lin_root.bias
            for rel in rels:
                if convs[rel].lin_l.bias is not None:
                    total = total + convs[rel].lin_l.bias
            roots[name] = lin_root.weight.detach().t().contiguous()
            bias[name] = total.detach().clone()
            incoming[name] = rels
        relation = {rel: convs[rel].lin_l.weight.detach().t().contiguous() for rel in self._relations}
        packed = _PackedSage(roots, bias, relation, incoming)
        self._cache[id(owner)] = (key, packed)
        return packed

    def heads(self, model: TamiyoGNN) -> _PackedHeads:
        """The packed heads (see `_PackedHeads`)."""
        modules: tuple[nn.Module, ...] = (model.slot_head, model.blueprint_head, model.action_head)
        modules += (model.blend_head, model.schedule_head, model.lr_head, model.value_head)
        key = self._key(*modules)
        cached = self._cache.get(id(model.slot_head))
        if cached is not None and cached[0] == key:
            return cached[1]  # type: ignore[return-value]
        packed = _pack_heads(model)
        self._cache[id(model.slot_head)] = (key, packed)
        return packed

    def gat(self, convs: dict[EdgeKey, GATConv], owner: nn.Module) -> _PackedGat:
        """The packed weights of one GAT layer."""
        key = self._key(owner)
        cached = self._cache.get(id(owner))
        if cached is not None and cached[0] == key:
            return cached[1]  # type: ignore[return-value]
        columns: dict[str, list[Tensor]] = {name: [] for name in self._types}
        widths: dict[str, int] = {name: 0 for name in self._types}
        slices: dict[tuple[EdgeKey, str], tuple[str, int, int]] = {}

        def add(name: str, rel: EdgeKey, part: str, block: Tensor) -> None:
            slices[(rel, part)] = (name, widths[name], block.shape[1])
            columns[name].append(block)
            widths[name] += block.shape[1]

        edge_map, bias = {}, {}
        for rel in self._relations:
            conv = convs[rel]
            assert conv.lin_src is not None and conv.lin_dst is not None and conv.lin_edge is not None
            heads, channels = conv.heads, conv.out_channels
            add(rel[0], rel, "src", conv.lin_src.weight.detach().t())
            add(rel[0], rel, "a_src", _attention_map(conv.lin_src, conv.att_src, heads, channels))
            add(rel[2], rel, "a_dst", _attention_map(conv.lin_dst, conv.att_dst, heads, channels))
            assert conv.att_edge is not None
            edge_map[rel] = _attention_map(conv.lin_edge, conv.att_edge, heads, channels).contiguous()
            bias[rel] = conv.bias.detach().clone() if conv.bias is not None else torch.zeros(heads * channels)
        weight = {name: torch.cat(parts, dim=1).contiguous() for name, parts in columns.items() if parts}
        bias_by_type: dict[str, Tensor] = {}
        for rel in self._relations:
            dst = rel[2]
            bias_by_type[dst] = bias_by_type[dst] + bias[rel] if dst in bias_by_type else bias[rel].clone()
        packed = _PackedGat(weight, slices, edge_map, bias, bias_by_type, next(_generations))
        self._cache[id(owner)] = (key, packed)
        return packed


def _pack_heads(model: TamiyoGNN) -> _PackedHeads:
    gat = model.config.gat_dim
    slot_in: nn.Linear = model.slot_head[0]  # type: ignore[assignment]
    slot_out: nn.Linear = model.slot_head[2]  # type: ignore[assignment]
    bp_in: nn.Linear = model.blueprint_head[0]  # type: ignore[assignment]
    bp_out: nn.Linear = model.blueprint_head[2]  # type: ignore[assignment]
    plain = (model.action_head, model.blend_head, model.schedule_head, model.lr_head, model.value_head)
    weights: list[Tensor] = [slot_in.weight[:, gat:], bp_in.weight[:, gat:], *(head.weight for head in plain)]
    biases: list[Tensor] = [slot_in.bias, bp_in.bias, *(head.bias for head in plain)]

    def transposed(weight: Tensor) -> Tensor:
        return weight.detach().t().contiguous().clone()  # a copy even where `.t()` is already contiguous

    return _PackedHeads(
        context_weight=transposed(torch.cat(weights, dim=0)),
        context_bias=torch.cat(biases).detach().clone(),
        splits=tuple(int(w.shape[0]) for w in weights),
        slot_node=transposed(slot_in.weight[:, :gat]),
        slot_out=(transposed(slot_out.weight), slot_out.bias.detach().clone()),
        blueprint_node=transposed(bp_in.weight[:, :gat]),
        blueprint_out=(transposed(bp_out.weight), bp_out.bias.detach().clone()),
    )


def _dense_attention(
    relation: _DenseRelation, *, heads: int, src: Tensor, a_src: Tensor, a_dst: Tensor, edge: Tensor | None
) -> Tensor:
    """GATConv's aggregation on dense blocks: softmax of leaky-ReLU logits over each destination's
    incoming edges, weighted sum of source features. Destinations without edges get 0 (PyG: 0 + bias).

    Logits are laid out [H, n_dst, n_src] (contiguous), so the weighted sum is one batched GEMM.
    `edge` is the edge term in the same layout."""
    n_dst, n_src = relation.mask.shape
    logits = a_dst.t()[:, :, None] + a_src.t()[:, None, :]
    if edge is not None:
        logits += edge
    torch.nn.functional.leaky_relu_(logits, 0.2)
    if not relation.complete:
        logits += relation.log_mask
    weights = torch.softmax(logits, dim=2)
    if relation.empty_rows:
        weights = weights.nan_to_num_(0.0)  # a row of -inf (no edge) -> NaN -> 0
    channels = src.shape[1] // heads
    out = torch.bmm(weights, src.view(n_src, heads, channels).transpose(0, 1))
    return out.transpose(0, 1).reshape(n_dst, heads * channels)


def _on(tensor: Tensor, device: torch.device) -> Tensor:
    """`tensor` on `device`, without a dispatch when it is already there (the usual case)."""
    return tensor if tensor.device == device else tensor.to(device)


def _version(tensor: Tensor) -> int | None:
    """The in-place version counter, or None for an inference tensor (which has none)."""
    return None if tensor.is_inference() else tensor._version


def _unchanged(cached: Tensor, version: int | None, current: Tensor) -> bool:
    """`current` holds what `cached` held when its blocks were built: the very same, unmodified tensor
    (the builder reuses a topology's tensors), or equal contents; a modified cached tensor never matches."""
    if version is None or cached._version != version:
        return False
    if cached is current:
        return True
    return cached.shape == current.shape and cached.dtype == current.dtype and torch.equal(cached, current)


def _no_checkpoint() -> None:
    return None


class PlanError(EsperError):
    """A per-topology plan could not be built (the dense path serves instead)."""


EdgeLogits = Callable[[int, EdgeKey, _DenseRelation, _PackedGat], Tensor]


def _dense_edge_features(index: Tensor, attr: Tensor, n_dst: int, n_src: int) -> Tensor:
    """Edge features `[E, d]` laid out `[n_dst, n_src, d]` (zeros where there is no edge)."""
    dense = attr.new_zeros((n_dst, n_src, attr.shape[1]))
    dense[index[1], index[0]] = attr
    return dense


def _edge_term(dense_attr: Tensor, edge_map: Tensor) -> Tensor:
    """A relation's edge term of the attention logits, [H, n_dst, n_src], from its dense edge features."""
    return (dense_attr @ edge_map).permute(2, 0, 1).contiguous()


def _cached_edge_logits(layer: int, rel: EdgeKey, relation: _DenseRelation, gat: _PackedGat) -> Tensor:
    """The edge term of `rel` in a GAT layer, kept with the relation's dense blocks (by packing)."""
    edge = relation.edge_logits.get(gat.generation)
    if edge is None:
        relation.edge_logits.clear()
        edge = relation.edge_logits[gat.generation] = _edge_term(relation.attr, gat.edge_map[rel])
    return edge


class _DenseRun:
    """The dense inference path over one graph's dense blocks, layer by layer.

    Stages take and return per-type features as sequences in schema order, so that `_Plan` can trace
    them; the eager path calls them with the decision's cancellation checkpoint. `edge_logits` gives a
    relation's edge term (cached with the dense blocks on the eager path, computed from the plan's
    inputs on a traced one)."""

    def __init__(
        self,
        model: TamiyoGNN,
        adjacency: dict[EdgeKey, _DenseRelation],
        edge_logits: EdgeLogits,
        checkpoint: Checkpoint,
    ) -> None:
        self._model = model
        self._types = model._types
        self._adjacency = adjacency
        self._edge_logits = edge_logits
        self._checkpoint = checkpoint

    def encode(self, xs: Sequence[Tensor], masks: Sequence[Tensor]) -> list[Tensor]:
        """Per-type encoders on the features and their presence mask side by side."""
        device = self._model.device
        out = []
        for name, x, mask in zip(self._types, xs, masks, strict=True):
            encoder: nn.Linear = self._model.encoders[name][0]  # type: ignore[index]
            features = _on(torch.cat([x, mask], dim=1), device)
            out.append(torch.relu_(torch.nn.functional.linear(features, encoder.weight, encoder.bias)))
        return out

    def sage(self, layer: int, hs: Sequence[Tensor]) -> list[Tensor]:
        """SAGE layer `layer`: root product, each relation's mean aggregation, ReLU, residual."""
        model = self._model
        sage = model._kernel.sage(model._sage_convs[layer], model.sage_root[layer], model.sage[layer])  # type: ignore[arg-type]
        h = dict(zip(self._types, hs, strict=True))
        out = []
        for name in self._types:
            self._checkpoint()  # per node type: a late decision stops within a fraction of a layer
            acc = torch.addmm(sage.bias[name], h[name], sage.root[name])
            for rel in sage.incoming[name]:
                mean, neighbours = self._adjacency[rel].mean, h[rel[0]]
                if neighbours.shape[0] < h[name].shape[0]:  # the weight meets the smaller node set
                    acc.addmm_(mean, torch.mm(neighbours, sage.relation[rel]))
                else:
                    acc.addmm_(torch.mm(mean, neighbours), sage.relation[rel])
            out.append(torch.relu_(acc).add_(h[name]))
        return out

    def hidden(self, xs: Sequence[Tensor], masks: Sequence[Tensor]) -> list[Tensor]:
        """The encoders and the SAGE layers, with the checkpoint before each layer."""
        hs = self.encode(xs, masks)
        for layer in range(len(self._model.sage)):
            self._checkpoint()
            hs = self.sage(layer, hs)
        return hs

    def attend(self, hs: Sequence[Tensor]) -> list[Tensor]:
        """The GAT layers on the SAGE features `hs` (the first with their skip map as its residual), with
        the checkpoint before each layer after the first."""
        out = self.gat(0, hs, self.skip(hs))
        for layer in range(1, len(self._model.gat)):
            self._checkpoint()
            out = self.gat(layer, out, out)
        return out

    def skip(self, hs: Sequence[Tensor]) -> list[Tensor]:
        """The GAT block's residual input: a linear map of the SAGE features."""
        out = []
        for name, pre in zip(self._types, hs, strict=True):
            skip: nn.Linear = self._model.gat_skip[name]  # type: ignore[assignment]
            out.append(torch.nn.functional.linear(pre, skip.weight, skip.bias))
        return out

    def gat(self, layer: int, source: Sequence[Tensor], hs: Sequence[Tensor]) -> list[Tensor]:
        """GAT layer `layer` on `source` features, ELU, added to the residual `hs`."""
        model = self._model
        gat = model._kernel.gat(model._gat_convs[layer], model.gat[layer])
        sources = dict(zip(self._types, source, strict=True))
        projected = {name: torch.mm(sources[name], weight) for name, weight in gat.weight.items()}
        out: dict[str, Tensor] = {}
        for rel, relation in self._adjacency.items():
            n_dst, n_src = relation.mask.shape
            if n_src == 0 or n_dst == 0:
                continue  # no edges: PyG gives 0 (+ the bias, added below for every relation)
            self._checkpoint()
            src = gat.part(projected, rel, "src")
            if relation.single:
                # One edge per destination at most: its softmax weight is exactly 1.
                term = torch.mm(relation.mean, src)
            else:
                term = _dense_attention(
                    relation,
                    heads=gat.edge_map[rel].shape[1],
                    src=src,
                    a_src=gat.part(projected, rel, "a_src"),
                    a_dst=gat.part(projected, rel, "a_dst"),
                    edge=self._edge_logits(layer, rel, relation, gat)
                    if model._declared_edge_features[rel]
                    else None,
                )
            dst = rel[2]
            if dst in out:
                out[dst] += term
            else:
                out[dst] = term
        result = []
        for name, h in zip(self._types, hs, strict=True):
            bias = gat.bias_by_type.get(name)
            if bias is None:
                result.append(h)
                continue
            total = out[name] + bias if name in out else bias.expand(h.shape[0], -1)
            result.append(torch.nn.functional.elu(total) + h)
        return result

    def heads(self, hs: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """The heads of one graph with the packed head weights, in `GNNOutput`'s field order."""
        model = self._model
        heads = model._kernel.heads(model)
        h = dict(zip(self._types, hs, strict=True))
        pooled = torch.cat(
            [
                h[name].mean(0, keepdim=True) if h[name].shape[0] else h[name].new_zeros(1, h[name].shape[1])
                for name in self._types
            ],
            dim=1,
        )
        readout: nn.Linear = model.readout[0]  # type: ignore[assignment]
        context = torch.relu_(torch.nn.functional.linear(pooled, readout.weight, readout.bias))
        slot_ctx, bp_ctx, action, blend, schedule, lr, value = torch.split_with_sizes(
            torch.addmm(heads.context_bias, context, heads.context_weight), list(heads.splits), dim=1
        )
        slot_hidden = torch.relu_(torch.addmm(slot_ctx, h["slot"], heads.slot_node))
        bp_hidden = torch.relu_(torch.addmm(bp_ctx, h["blueprint"], heads.blueprint_node))
        slot_scores = torch.addmm(heads.slot_out[1], slot_hidden, heads.slot_out[0]).squeeze(-1)
        bp_scores = torch.addmm(heads.blueprint_out[1], bp_hidden, heads.blueprint_out[0]).squeeze(-1)
        return action, slot_scores, bp_scores, blend, schedule, lr, value.squeeze(-1)


_PLAN_WARM_CALLS = 3  # TorchScript's profiling executor optimises a graph after its first runs


class _Stage(nn.Module):
    """One segment of the dense path as a module for `torch.jit.trace`. It holds the network, so the
    weights it reads are module attributes, which freezing turns into constants."""

    def __init__(self, model: TamiyoGNN, stage: Callable[..., Sequence[Tensor]]) -> None:
        super().__init__()
        self.model = model
        self._stage = stage

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        return tuple(self._stage(*inputs))


@dataclass(frozen=True)
class _Plan:
    """The dense path for one topology and one set of weights, traced and frozen with TorchScript.

    A decision's forward is ~250 small tensor operations; on this CPU, with the run's training between
    decisions, much of its time is the Python around each operation and the interpreter's working set
    coming back into the caches. A frozen trace runs the same operations from TorchScript's interpreter
    with the dense blocks and the packed weights as constants: 0.7-0.8x the dense path's time
    (docs/p7-attention-and-cuda-graphs.md, Decision 5).

    Fixed by the trace: node counts per type, the edges (so the dense blocks and the aggregation
    orders) and the weights. Inputs: node features, presence masks, and the edge terms of the relations
    that attend over several edges, computed here from their edge features and kept while those do not
    change (a seed's blueprint changes them, the topology stays). Two segments, SAGE and GAT with the
    heads, with the cancellation checkpoint around each: a late decision stops within half the network.
    `fits` and `weights` say when a plan no longer applies; the dense path then serves until the next
    `TamiyoGNN.build_plan`.
    """

    weights: tuple[int, ...]
    types: tuple[str, ...]
    rows: tuple[int, ...]
    edges: tuple[tuple[EdgeKey, Tensor, int | None], ...]
    attr_relations: tuple[EdgeKey, ...]
    sage: Callable[..., tuple[Tensor, ...]]
    gat: Callable[..., tuple[Tensor, ...]]
    # Per relation in `attr_relations`: the edge features the current edge terms come from, their
    # version, and the terms (one per GAT layer).
    edge_terms_cache: dict[EdgeKey, tuple[Tensor, int | None, tuple[Tensor, ...]]] = field(
        default_factory=dict
    )

    @classmethod
    def trace(
        cls,
        model: TamiyoGNN,
        graph: TamiyoGraph,
        adjacency: dict[EdgeKey, _DenseRelation],
        edge_attr: dict[EdgeKey, Tensor],
    ) -> _Plan:
        """Trace and freeze both segments on `graph` (with autograd off, outside inference mode)."""
        types = model._types
        n_types, n_gat = len(types), len(model.gat)
        attr_relations = tuple(
            rel
            for rel, relation in adjacency.items()
            if model._declared_edge_features[rel] and not relation.single and relation.mask.numel()
        )

        def run(edge_terms: Sequence[Tensor]) -> _DenseRun:
            keys = [(layer, rel) for layer in range(n_gat) for rel in attr_relations]
            by_layer = dict(zip(keys, edge_terms, strict=False))  # none for the SAGE segment

            def logits(layer: int, rel: EdgeKey, relation: _DenseRelation, gat: _PackedGat) -> Tensor:
                return by_layer[(layer, rel)]

            return _DenseRun(model, adjacency, logits, _no_checkpoint)

        def sage(*inputs: Tensor) -> Sequence[Tensor]:
            return run(()).hidden(inputs[:n_types], inputs[n_types:])

        def gat(*inputs: Tensor) -> Sequence[Tensor]:
            r = run(inputs[n_types:])
            return r.heads(r.attend(inputs[:n_types]))

        edges = tuple(
            (rel, graph.edge_index[rel], _version(graph.edge_index[rel])) for rel in model._relations
        )
        rows = tuple(int(graph.x[name].shape[0]) for name in types)
        features = (*(graph.x[name] for name in types), *(graph.mask[name] for name in types))
        with warnings.catch_warnings():
            # torch.jit says it is deprecated in favour of torch.compile, which on this CPU recompiles for
            # minutes per graph size and gains nothing here (docs/p7-attention-and-cuda-graphs.md).
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # type: ignore[attr-defined]
            sage_frozen = torch.jit.freeze(
                torch.jit.trace(_Stage(model, sage).eval(), features, check_trace=False)  # type: ignore[no-untyped-call]
            )
            # The GAT segment's example inputs need the plan's edge terms; its trace replaces the stand-in.
            plan = cls(
                model._kernel._key(model), types, rows, edges, attr_relations, sage_frozen, sage_frozen
            )
            hidden = sage_frozen(*features)
            example = (*hidden, *plan.edge_terms(model, graph, edge_attr))
            gat_frozen = torch.jit.freeze(
                torch.jit.trace(_Stage(model, gat).eval(), example, check_trace=False)  # type: ignore[no-untyped-call]
            )
        return dataclasses.replace(plan, gat=gat_frozen)

    def fits(self, graph: TamiyoGraph) -> bool:
        """Whether `graph` has this plan's topology (node counts and the very edges)."""
        for name, rows in zip(self.types, self.rows, strict=True):
            if graph.x[name].shape[0] != rows:
                return False
        return all(_unchanged(cached, version, graph.edge_index[rel]) for rel, cached, version in self.edges)

    def edge_terms(
        self, model: TamiyoGNN, graph: TamiyoGraph, edge_attr: dict[EdgeKey, Tensor]
    ) -> list[Tensor]:
        """The edge terms for `edge_attr`, layer by layer, recomputed only for changed edge features."""
        terms: list[list[Tensor]] = [[] for _ in model.gat]
        for rel in self.attr_relations:
            attr = edge_attr[rel]
            cached = self.edge_terms_cache.get(rel)
            if cached is None or not _unchanged(cached[0], cached[1], attr):
                n_dst, n_src = graph.x[rel[2]].shape[0], graph.x[rel[0]].shape[0]
                dense = _dense_edge_features(graph.edge_index[rel], attr, n_dst, n_src)
                per_layer = tuple(
                    _edge_term(dense, model._kernel.gat(convs, owner).edge_map[rel])
                    for convs, owner in zip(model._gat_convs, model.gat, strict=True)
                )
                with torch.inference_mode(False):  # a normal copy: its version is tracked
                    kept = attr.clone() if attr.is_inference() else attr
                cached = self.edge_terms_cache[rel] = (kept, _version(kept), per_layer)
            for layer, term in enumerate(cached[2]):
                terms[layer].append(term)
        return [term for layer in terms for term in layer]

    def run(
        self, model: TamiyoGNN, graph: TamiyoGraph, edge_attr: dict[EdgeKey, Tensor], checkpoint: Checkpoint
    ) -> GNNOutput:
        """The network on `graph` (which `fits`), checking `checkpoint` before and after each segment."""
        checkpoint()
        hidden = self.sage(
            *(graph.x[name] for name in self.types), *(graph.mask[name] for name in self.types)
        )
        checkpoint()
        outputs = self.gat(*hidden, *self.edge_terms(model, graph, edge_attr))
        checkpoint()
        return GNNOutput(*outputs)


def _outputs(output: GNNOutput) -> tuple[Tensor, ...]:
    return tuple(getattr(output, name) for name in GNNOutput.__dataclass_fields__)


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
        # Inference without autograd runs the dense kernel (same weights, same function, far fewer ops).
        self.dense_inference = True
        self._kernel = _DenseKernel(self._types, self._relations)
        # Per relation: the edges and edge features the cached dense blocks were built from, with the
        # version counters they had then (the builder hands the same tensors while the topology holds).
        self._adjacency_cache: dict[
            EdgeKey, tuple[Tensor, int | None, Tensor, int | None, _DenseRelation]
        ] = {}
        self._zero_attr: dict[EdgeKey, Tensor] = {}  # zero features of featureless relations (read-only)
        self._plan: _Plan | None = None  # the dense path traced for one topology (`build_plan`)

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
                if zeros is None or zeros.shape[0] != count:
                    with torch.inference_mode(False):  # a normal tensor: its version is tracked
                        zeros = self._zero_attr[key] = torch.zeros((count, self._edge_dims[key]))
                attr = zeros
            if attr.shape != (count, self._edge_dims[key]):
                raise GraphSchemaError(
                    f"gnn.edge_attr[{key}]",
                    f"shape {tuple(attr.shape)}, expected ({count}, {self._edge_dims[key]})",
                )
            attrs[key] = _on(attr, device)
        return attrs

    def forward(self, graph: TamiyoGraph, checkpoint: Checkpoint = _no_checkpoint) -> GNNOutput:
        """Run the network on `graph` (one graph or a batch).

        Without autograd (inference) and with `dense_inference` on, the dense kernel runs; with gradients
        (Simic's training) PyG's message passing does. Both compute the same function of the same weights.
        """
        self._check(graph)
        device = self.device
        edge_attr = self.edge_attrs(graph, device)
        if self.dense_inference and not torch.is_grad_enabled():
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
        checkpoint: Checkpoint = _no_checkpoint,
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
    ) -> dict[EdgeKey, _DenseRelation] | None:
        """Each relation as dense [n_dst, n_src] matrices, or None when a relation repeats an edge.

        Tamiyo's graphs have at most a few hundred nodes per type, so dense blocks cost little and turn
        every gather/scatter of message passing into one matrix product. Repeated edges (which message
        passing would count twice) send the caller back to the message-passing path.
        """
        dense: dict[EdgeKey, _DenseRelation] = {}
        for key in self._relations:
            src, _, dst = key
            n_src, n_dst = graph.x[src].shape[0], graph.x[dst].shape[0]
            index = _on(graph.edge_index[key], device)
            attr_in = edge_attr[key]
            # A run's topology rarely changes between decisions: reuse the blocks of identical edges.
            cached = self._adjacency_cache.get(key)
            if cached is not None:
                old_index, index_version, old_attr, attr_version, blocks = cached
                if (
                    blocks.mask.shape == (n_dst, n_src)
                    and _unchanged(old_index, index_version, index)
                    and _unchanged(old_attr, attr_version, attr_in)
                ):
                    dense[key] = blocks
                    continue
            count = torch.zeros((n_dst, n_src), device=device)
            count.index_put_((index[1], index[0]), torch.ones(index.shape[1], device=device), accumulate=True)
            if index.shape[1] and bool(count.max() > 1):
                return None
            attr = _dense_edge_features(index, attr_in, n_dst, n_src)
            in_degree = count.sum(1, keepdim=True)
            degree = in_degree.clamp(min=1.0)
            mask = count > 0
            log_mask = torch.zeros((1, n_dst, n_src), device=device).masked_fill(~mask[None], float("-inf"))
            dense[key] = _DenseRelation(
                mask=mask,
                mean=count / degree,
                attr=attr,
                log_mask=log_mask,
                single=bool(in_degree.max() <= 1) if n_dst else True,
                complete=bool(mask.all()),
                empty_rows=bool((in_degree == 0).any()),
            )
            self._adjacency_cache[key] = (index, _version(index), attr_in, _version(attr_in), dense[key])
        return dense

    def _forward_dense(
        self, graph: TamiyoGraph, adjacency: dict[EdgeKey, _DenseRelation], checkpoint: Checkpoint
    ) -> GNNOutput:
        run = _DenseRun(self, adjacency, _cached_edge_logits, checkpoint)
        hs = run.hidden([graph.x[name] for name in self._types], [graph.mask[name] for name in self._types])
        checkpoint()
        hs = run.attend(hs)
        checkpoint()
        if graph.num_graphs != 1:
            return self._heads(graph, dict(zip(self._types, hs, strict=True)), self.device)
        return GNNOutput(*run.heads(hs))

    # -- the per-topology plan ----------------------------------------------------------------------

    def build_plan(self, graph: TamiyoGraph) -> float:
        """Trace and freeze the dense path for `graph`'s topology and the current weights (see `_Plan`);
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
            plan = _Plan.trace(self, graph, adjacency, edge_attr)
            reference = self._forward_dense(graph, adjacency, _no_checkpoint)
            for _ in range(_PLAN_WARM_CALLS):  # TorchScript's profiling executor settles in the first calls
                planned = plan.run(self, graph, edge_attr, _no_checkpoint)
        for name, want, got in zip(
            GNNOutput.__dataclass_fields__, _outputs(reference), _outputs(planned), strict=True
        ):
            if want.shape != got.shape or not torch.allclose(want, got, rtol=1e-4, atol=1e-4):
                raise PlanError(f"the traced plan disagrees with the dense path on {name}")
        self._plan = plan
        return (time.perf_counter() - start) * 1e3

    def drop_plan(self) -> None:
        """Forget the plan (inference runs the dense path until `build_plan`)."""
        self._plan = None

    @property
    def has_plan(self) -> bool:
        """Whether a plan is held (it is used only while its topology and weights still hold)."""
        return self._plan is not None

    def _planned(self, graph: TamiyoGraph) -> _Plan | None:
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
        slot_h, bp_h = h["slot"], h["blueprint"]
        if graph.num_graphs == 1:  # one graph: pooling is a column mean (zeros for an empty node type)
            pooled = [
                h[name].mean(0, keepdim=True) if h[name].shape[0] else h[name].new_zeros(1, h[name].shape[1])
                for name in self._types
            ]
            context = self.readout(torch.cat(pooled, dim=1))
            slot_ctx = context.expand(slot_h.shape[0], -1)
            bp_ctx = context.expand(bp_h.shape[0], -1)
        else:
            batch = {name: graph.batch[name].to(device) for name in self._types}
            size = graph.num_graphs
            pooled = [
                scatter(h[name], batch[name], dim=0, dim_size=size, reduce="mean") for name in self._types
            ]
            context = self.readout(torch.cat(pooled, dim=1))
            slot_ctx = context[batch["slot"]]
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
