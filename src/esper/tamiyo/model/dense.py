"""The dense path: the GNN's message passing as dense per-relation matrix products, for one small graph.

It computes what the PyG layers compute, from the same parameters, without scatter and gather.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch_geometric.nn import GATConv, SAGEConv

from esper.tamiyo.model.outputs import Checkpoint
from esper.tamiyo.model.schema import EdgeKey

if TYPE_CHECKING:
    from esper.tamiyo.model.gnn import TamiyoGNN

_VERSION_OF = operator.attrgetter("_version")


@dataclass(frozen=True)
class DenseRelation:
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
class PackedSage:
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
class PackedGat:
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
class PackedHeads:
    """The heads for one graph: every product with the graph context in one matrix.

    Columns of `context_weight`: the slot head's, the blueprint head's and the layer head's first layer on
    the context half of their `[node | context]` input, then the action, blend, schedule, lr, value and
    amount heads (`splits`).
    """

    context_weight: Tensor  # [gat, columns]
    context_bias: Tensor
    splits: tuple[int, ...]
    slot_node: Tensor  # [gat, gat]: the slot head's first layer on the node half
    slot_out: tuple[Tensor, Tensor]  # last layer weight [gat, 1] and bias
    blueprint_node: Tensor
    blueprint_out: tuple[Tensor, Tensor]
    layer_node: Tensor
    layer_out: tuple[Tensor, Tensor]


_generations = itertools.count()


class DenseKernel:
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

    def sage(self, convs: dict[EdgeKey, SAGEConv], root: nn.ModuleDict, owner: nn.Module) -> PackedSage:
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
        packed = PackedSage(roots, bias, relation, incoming)
        self._cache[id(owner)] = (key, packed)
        return packed

    def heads(self, model: TamiyoGNN) -> PackedHeads:
        """The packed heads (see `PackedHeads`)."""
        modules: tuple[nn.Module, ...] = (model.slot_head, model.blueprint_head, model.action_head)
        modules += (model.blend_head, model.schedule_head, model.lr_head, model.value_head)
        modules += (model.layer_head, model.amount_head)
        key = self._key(*modules)
        cached = self._cache.get(id(model.slot_head))
        if cached is not None and cached[0] == key:
            return cached[1]  # type: ignore[return-value]
        packed = pack_heads(model)
        self._cache[id(model.slot_head)] = (key, packed)
        return packed

    def gat(self, convs: dict[EdgeKey, GATConv], owner: nn.Module) -> PackedGat:
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
            bias[rel] = (
                conv.bias.detach().clone()
                if conv.bias is not None
                else torch.zeros(
                    heads * channels, device=conv.lin_src.weight.device, dtype=conv.lin_src.weight.dtype
                )
            )
        weight = {name: torch.cat(parts, dim=1).contiguous() for name, parts in columns.items() if parts}
        bias_by_type: dict[str, Tensor] = {}
        for rel in self._relations:
            dst = rel[2]
            bias_by_type[dst] = bias_by_type[dst] + bias[rel] if dst in bias_by_type else bias[rel].clone()
        packed = PackedGat(weight, slices, edge_map, bias, bias_by_type, next(_generations))
        self._cache[id(owner)] = (key, packed)
        return packed


def pack_heads(model: TamiyoGNN) -> PackedHeads:
    gat = model.config.gat_dim
    slot_in: nn.Linear = model.slot_head[0]  # type: ignore[assignment]
    slot_out: nn.Linear = model.slot_head[2]  # type: ignore[assignment]
    bp_in: nn.Linear = model.blueprint_head[0]  # type: ignore[assignment]
    bp_out: nn.Linear = model.blueprint_head[2]  # type: ignore[assignment]
    layer_in: nn.Linear = model.layer_head[0]  # type: ignore[assignment]
    layer_out: nn.Linear = model.layer_head[2]  # type: ignore[assignment]
    plain = (
        model.action_head,
        model.blend_head,
        model.schedule_head,
        model.lr_head,
        model.value_head,
        model.amount_head,
    )
    pointers = (slot_in, bp_in, layer_in)
    weights: list[Tensor] = [*(head.weight[:, gat:] for head in pointers), *(head.weight for head in plain)]
    biases: list[Tensor] = [*(head.bias for head in pointers), *(head.bias for head in plain)]

    def transposed(weight: Tensor) -> Tensor:
        return weight.detach().t().contiguous().clone()  # a copy even where `.t()` is already contiguous

    return PackedHeads(
        context_weight=transposed(torch.cat(weights, dim=0)),
        context_bias=torch.cat(biases).detach().clone(),
        splits=tuple(int(w.shape[0]) for w in weights),
        slot_node=transposed(slot_in.weight[:, :gat]),
        slot_out=(transposed(slot_out.weight), slot_out.bias.detach().clone()),
        blueprint_node=transposed(bp_in.weight[:, :gat]),
        blueprint_out=(transposed(bp_out.weight), bp_out.bias.detach().clone()),
        layer_node=transposed(layer_in.weight[:, :gat]),
        layer_out=(transposed(layer_out.weight), layer_out.bias.detach().clone()),
    )


def _dense_attention(
    relation: DenseRelation, *, heads: int, src: Tensor, a_src: Tensor, a_dst: Tensor, edge: Tensor | None
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


def on_device(tensor: Tensor, device: torch.device) -> Tensor:
    """`tensor` on `device`, without a dispatch when it is already there (the usual case)."""
    return tensor if tensor.device == device else tensor.to(device)


def tensor_version(tensor: Tensor) -> int | None:
    """The in-place version counter, or None for an inference tensor (which has none)."""
    return None if tensor.is_inference() else tensor._version


def unchanged(cached: Tensor, version: int | None, current: Tensor) -> bool:
    """`current` holds what `cached` held when its blocks were built: the very same, unmodified tensor
    (the builder reuses a topology's tensors), or equal contents; a modified cached tensor never matches."""
    if version is None or cached._version != version:
        return False
    if cached is current:
        return True
    return cached.shape == current.shape and cached.dtype == current.dtype and torch.equal(cached, current)


EdgeLogits = Callable[[int, EdgeKey, DenseRelation, PackedGat], Tensor]


def dense_edge_features(index: Tensor, attr: Tensor, n_dst: int, n_src: int) -> Tensor:
    """Edge features `[E, d]` laid out `[n_dst, n_src, d]` (zeros where there is no edge)."""
    dense = attr.new_zeros((n_dst, n_src, attr.shape[1]))
    dense[index[1], index[0]] = attr
    return dense


def edge_term(dense_attr: Tensor, edge_map: Tensor) -> Tensor:
    """A relation's edge term of the attention logits, [H, n_dst, n_src], from its dense edge features."""
    return (dense_attr @ edge_map).permute(2, 0, 1).contiguous()


def cached_edge_logits(layer: int, rel: EdgeKey, relation: DenseRelation, gat: PackedGat) -> Tensor:
    """The edge term of `rel` in a GAT layer, kept with the relation's dense blocks (by packing)."""
    edge = relation.edge_logits.get(gat.generation)
    if edge is None:
        relation.edge_logits.clear()
        edge = relation.edge_logits[gat.generation] = edge_term(relation.attr, gat.edge_map[rel])
    return edge


class DenseRun:
    """The dense inference path over one graph's dense blocks, layer by layer.

    Stages take and return per-type features as sequences in schema order, so that `Plan` can trace
    them; the eager path calls them with the decision's cancellation checkpoint. `edge_logits` gives a
    relation's edge term (cached with the dense blocks on the eager path, computed from the plan's
    inputs on a traced one)."""

    def __init__(
        self,
        model: TamiyoGNN,
        adjacency: dict[EdgeKey, DenseRelation],
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
            features = on_device(torch.cat([x, mask], dim=1), device)
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
        slot_ctx, bp_ctx, layer_ctx, action, blend, schedule, lr, value, amount = torch.split_with_sizes(
            torch.addmm(heads.context_bias, context, heads.context_weight), list(heads.splits), dim=1
        )
        slot_hidden = torch.relu_(torch.addmm(slot_ctx, h["slot"], heads.slot_node))
        bp_hidden = torch.relu_(torch.addmm(bp_ctx, h["blueprint"], heads.blueprint_node))
        layer_hidden = torch.relu_(torch.addmm(layer_ctx, h["layer"], heads.layer_node))
        slot_scores = torch.addmm(heads.slot_out[1], slot_hidden, heads.slot_out[0]).squeeze(-1)
        bp_scores = torch.addmm(heads.blueprint_out[1], bp_hidden, heads.blueprint_out[0]).squeeze(-1)
        layer_scores = torch.addmm(heads.layer_out[1], layer_hidden, heads.layer_out[0]).squeeze(-1)
        return action, slot_scores, bp_scores, blend, schedule, lr, value.squeeze(-1), layer_scores, amount
