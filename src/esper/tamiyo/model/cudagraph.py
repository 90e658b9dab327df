"""P7: the decision's forward captured in a CUDA graph for one fixed topology, replayed with new features.

Only on CUDA, and only behind `TAMIYO_ENABLE_CUDA_GRAPH`. A capture holds the dense path for one graph's
topology (node counts, the very edges and their edge features) and one set of weights, with its inputs
(node features and presence masks) in static device buffers. A decision whose graph has that topology
copies its features into the buffers and replays the graph: one launch instead of a few hundred. Any
other graph (the host grew, a seed's blueprint changed an edge feature, the weights moved on) does not
fit: the traced plan or the dense path serves it, the miss is counted, and the next rehearsal captures
again. A capture that cannot be made (not on CUDA, a relation that repeats an edge, an operation that
cannot be captured, a result that disagrees with the dense path) raises `CaptureUnavailable` and keeps
nothing; the policy reports it and serves without.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from esper.tamiyo.model.graph import TamiyoGraph
from esper.tamiyo.model.outputs import Checkpoint, GNNOutput, no_checkpoint
from esper.tamiyo.model.plan import PlanError, plan_outputs
from esper.tamiyo.model.schema import EdgeKey

if TYPE_CHECKING:
    from esper.tamiyo.model.gnn import TamiyoGNN

CAPTURE_WARM_CALLS = 3  # runs on a side stream before capture (allocator and library handles settle)


class CaptureUnavailable(PlanError):
    """No CUDA graph for this graph or device (the plan or the dense path serves)."""


def cuda_graphs_available(device: torch.device) -> str:
    """Why a CUDA graph cannot be captured on `device` ("" when it can)."""
    if device.type != "cuda":
        return f"not available: the policy is on {device} (CUDA graphs need a CUDA device)"
    if not torch.cuda.is_available():
        return "not available: CUDA is not available"
    return ""


@dataclass(frozen=True)
class CapturedForward:
    """The dense path of one topology captured in a CUDA graph, its static inputs and outputs."""

    weights: tuple[int, ...]
    types: tuple[str, ...]
    rows: tuple[int, ...]
    edge_index: dict[EdgeKey, Tensor]  # CPU copies: what a graph must hold to fit
    edge_attr: dict[EdgeKey, Tensor]
    x: dict[str, Tensor]  # the static device buffers the replay reads
    mask: dict[str, Tensor]
    outputs: GNNOutput  # the static device buffers the replay writes
    graph: torch.cuda.CUDAGraph

    @classmethod
    def capture(cls, model: TamiyoGNN, graph: TamiyoGraph) -> CapturedForward:
        """Capture the dense path on `graph` (one graph) and check one replay against it."""
        device = model.device
        why = cuda_graphs_available(device)
        if why:
            raise CaptureUnavailable(why)
        if graph.num_graphs != 1:
            raise CaptureUnavailable(f"a capture is made for one graph, got a batch of {graph.num_graphs}")
        types = tuple(model._types)
        with torch.inference_mode(False), torch.no_grad():
            static = dataclasses.replace(
                graph,
                x={name: graph.x[name].to(device, copy=True) for name in types},
                mask={name: graph.mask[name].to(device, copy=True) for name in types},
                edge_index={key: value.to(device) for key, value in graph.edge_index.items()},
                edge_attr={key: value.to(device) for key, value in graph.edge_attr.items()},
            )
            edge_attr = model.edge_attrs(static, device)
            adjacency = model.dense_adjacency(static, edge_attr, device)
            if adjacency is None:
                raise CaptureUnavailable(
                    "a relation repeats an edge: this graph takes the message-passing path"
                )

            def forward() -> GNNOutput:
                return model._forward_dense(static, adjacency, no_checkpoint)

            try:
                side = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    for _ in range(CAPTURE_WARM_CALLS):
                        forward()
                torch.cuda.current_stream(device).wait_stream(side)
                cuda_graph = torch.cuda.CUDAGraph()
                # thread_local: the trainer's CUDA work on its own thread goes on while this captures
                with torch.cuda.graph(cuda_graph, capture_error_mode="thread_local"):
                    outputs = forward()
                reference = forward()
                cuda_graph.replay()
                torch.cuda.synchronize(device)
            except RuntimeError as exc:  # an operation that cannot be captured (a host sync, a CPU op)
                raise CaptureUnavailable(f"capture failed: {type(exc).__name__}: {exc}") from exc
        for name, want, got in zip(
            GNNOutput.__dataclass_fields__, plan_outputs(reference), plan_outputs(outputs), strict=True
        ):
            if want.shape != got.shape or not torch.allclose(want, got, rtol=1e-4, atol=1e-4):
                raise CaptureUnavailable(f"the captured forward disagrees with the dense path on {name}")
        return cls(
            weights=model._kernel._key(model),
            types=types,
            rows=tuple(int(graph.x[name].shape[0]) for name in types),
            edge_index={key: value.detach().to("cpu", copy=True) for key, value in graph.edge_index.items()},
            edge_attr={key: value.detach().to("cpu", copy=True) for key, value in graph.edge_attr.items()},
            x=static.x,
            mask=static.mask,
            outputs=outputs,
            graph=cuda_graph,
        )

    def fits(self, graph: TamiyoGraph) -> bool:
        """Whether `graph` has the captured topology: node counts, edges and edge features (all compared
        on the CPU, where the builder makes them: no device work)."""
        if graph.num_graphs != 1:
            return False
        for name, rows in zip(self.types, self.rows, strict=True):
            if graph.x[name].shape[0] != rows:
                return False
        if (
            graph.edge_index.keys() != self.edge_index.keys()
            or graph.edge_attr.keys() != self.edge_attr.keys()
        ):
            return False
        return all(_same(self.edge_index[key], value) for key, value in graph.edge_index.items()) and all(
            _same(self.edge_attr[key], value) for key, value in graph.edge_attr.items()
        )

    def run(self, graph: TamiyoGraph, checkpoint: Checkpoint) -> GNNOutput:
        """The network on `graph` (which `fits`): its features into the buffers, one replay, the outputs
        copied out (the next replay overwrites the buffers)."""
        checkpoint()
        for name in self.types:
            self.x[name].copy_(graph.x[name], non_blocking=True)
            self.mask[name].copy_(graph.mask[name], non_blocking=True)
        self.graph.replay()
        checkpoint()
        return GNNOutput(*(tensor.clone() for tensor in plan_outputs(self.outputs)))


def _same(kept: Tensor, current: Tensor) -> bool:
    if kept.shape != current.shape or kept.dtype != current.dtype:
        return False
    return torch.equal(kept, current if current.device.type == "cpu" else current.cpu())
