"""The traced plan: the dense path for one topology, traced with TorchScript and checked against it."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from esper.leyline import EsperError
from esper.tamiyo.model.dense import (
    DenseRelation,
    DenseRun,
    PackedGat,
    dense_edge_features,
    edge_term,
    on_device,
    tensor_version,
    unchanged,
)
from esper.tamiyo.model.graph import TamiyoGraph
from esper.tamiyo.model.outputs import Checkpoint, GNNOutput, no_checkpoint
from esper.tamiyo.model.schema import EdgeKey

if TYPE_CHECKING:
    from esper.tamiyo.model.gnn import TamiyoGNN


class PlanError(EsperError):
    """A per-topology plan could not be built (the dense path serves instead)."""


PLAN_WARM_CALLS = 3  # TorchScript's profiling executor optimises a graph after its first runs


class Stage(nn.Module):
    """One segment of the dense path as a module for `torch.jit.trace`. It holds the network, so the
    weights it reads are module attributes, which freezing turns into constants."""

    def __init__(self, model: TamiyoGNN, stage: Callable[..., Sequence[Tensor]]) -> None:
        super().__init__()
        self.model = model
        self._stage = stage

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        return tuple(self._stage(*inputs))


@dataclass(frozen=True)
class Plan:
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
        adjacency: dict[EdgeKey, DenseRelation],
        edge_attr: dict[EdgeKey, Tensor],
    ) -> Plan:
        """Trace and freeze both segments on `graph` (with autograd off, outside inference mode)."""
        types = model._types
        n_types, n_gat = len(types), len(model.gat)
        attr_relations = tuple(
            rel
            for rel, relation in adjacency.items()
            if model._declared_edge_features[rel] and not relation.single and relation.mask.numel()
        )

        def run(edge_terms: Sequence[Tensor]) -> DenseRun:
            keys = [(layer, rel) for layer in range(n_gat) for rel in attr_relations]
            by_layer = dict(zip(keys, edge_terms, strict=False))  # none for the SAGE segment

            def logits(layer: int, rel: EdgeKey, relation: DenseRelation, gat: PackedGat) -> Tensor:
                return by_layer[(layer, rel)]

            return DenseRun(model, adjacency, logits, no_checkpoint)

        def sage(*inputs: Tensor) -> Sequence[Tensor]:
            return run(()).hidden(inputs[:n_types], inputs[n_types:])

        def gat(*inputs: Tensor) -> Sequence[Tensor]:
            r = run(inputs[n_types:])
            return r.heads(r.attend(inputs[:n_types]))

        edges = tuple(
            (rel, graph.edge_index[rel], tensor_version(graph.edge_index[rel])) for rel in model._relations
        )
        rows = tuple(int(graph.x[name].shape[0]) for name in types)
        features = plan_inputs(graph, types, model.device)
        with warnings.catch_warnings():
            # torch.jit says it is deprecated in favour of torch.compile, which on this CPU recompiles for
            # minutes per graph size and gains nothing here (docs/p7-attention-and-cuda-graphs.md).
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # type: ignore[attr-defined]
            sage_frozen = torch.jit.freeze(
                torch.jit.trace(Stage(model, sage).eval(), features, check_trace=False)  # type: ignore[no-untyped-call]
            )
            # The GAT segment's example inputs need the plan's edge terms; its trace replaces the stand-in.
            plan = cls(
                model._kernel._key(model), types, rows, edges, attr_relations, sage_frozen, sage_frozen
            )
            hidden = sage_frozen(*features)
            example = (*hidden, *plan.edge_terms(model, graph, edge_attr))
            gat_frozen = torch.jit.freeze(
                torch.jit.trace(Stage(model, gat).eval(), example, check_trace=False)  # type: ignore[no-untyped-call]
            )
        return dataclasses.replace(plan, gat=gat_frozen)

    def fits(self, graph: TamiyoGraph) -> bool:
        """Whether `graph` has this plan's topology (node counts and the very edges)."""
        for name, rows in zip(self.types, self.rows, strict=True):
            if graph.x[name].shape[0] != rows:
                return False
        return all(unchanged(cached, version, graph.edge_index[rel]) for rel, cached, version in self.edges)

    def edge_terms(
        self, model: TamiyoGNN, graph: TamiyoGraph, edge_attr: dict[EdgeKey, Tensor]
    ) -> list[Tensor]:
        """The edge terms for `edge_attr`, layer by layer, recomputed only for changed edge features."""
        terms: list[list[Tensor]] = [[] for _ in model.gat]
        for rel in self.attr_relations:
            attr = edge_attr[rel]
            cached = self.edge_terms_cache.get(rel)
            if cached is None or not unchanged(cached[0], cached[1], attr):
                n_dst, n_src = graph.x[rel[2]].shape[0], graph.x[rel[0]].shape[0]
                dense = dense_edge_features(graph.edge_index[rel], attr, n_dst, n_src)
                per_layer = tuple(
                    edge_term(dense, model._kernel.gat(convs, owner).edge_map[rel])
                    for convs, owner in zip(model._gat_convs, model.gat, strict=True)
                )
                with torch.inference_mode(False):  # a normal copy: its version is tracked
                    kept = attr.clone() if attr.is_inference() else attr
                cached = self.edge_terms_cache[rel] = (kept, tensor_version(kept), per_layer)
            for layer, term in enumerate(cached[2]):
                terms[layer].append(term)
        return [term for layer in terms for term in layer]

    def run(
        self, model: TamiyoGNN, graph: TamiyoGraph, edge_attr: dict[EdgeKey, Tensor], checkpoint: Checkpoint
    ) -> GNNOutput:
        """The network on `graph` (which `fits`), checking `checkpoint` before and after each segment."""
        checkpoint()
        hidden = self.sage(*plan_inputs(graph, self.types, model.device))
        checkpoint()
        outputs = self.gat(*hidden, *self.edge_terms(model, graph, edge_attr))
        checkpoint()
        return GNNOutput(*outputs)


def plan_inputs(graph: TamiyoGraph, types: Sequence[str], device: torch.device) -> tuple[Tensor, ...]:
    """Node features then presence masks, type by type, on `device` (the network's)."""
    return (
        *(on_device(graph.x[name], device) for name in types),
        *(on_device(graph.mask[name], device) for name in types),
    )


def plan_outputs(output: GNNOutput) -> tuple[Tensor, ...]:
    return tuple(getattr(output, name) for name in GNNOutput.__dataclass_fields__)
