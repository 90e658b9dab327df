"""What a policy proposes: one factored choice over the action, slot, blueprint, blend mode and schedule.

Every policy (the heuristic baseline and the GNN) returns a `Proposal`; the protocols a policy meets
(`Policy`, `GraphPolicy`) and the status records of the GNN's inference live here too, without PyTorch
Geometric, so a heuristic run never loads it. the risk gates may override it and
the command factory turns the final one into a signed command. A proposal never invents ids: it names a
slot and a blueprint taken from the packet, or none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from esper.leyline import EsperError, pb
from esper.tamiyo.model.normalizer_state import NormalizerState

if TYPE_CHECKING:
    from esper.tamiyo.model.builder import GraphBuilder
    from esper.tamiyo.model.graph import TamiyoGraph

# The action head, in head order (index i has PolicyAction value i + 1).
ACTIONS: tuple[int, ...] = (
    pb.POLICY_ACTION_WAIT,
    pb.POLICY_ACTION_GERMINATE,
    pb.POLICY_ACTION_FOSSILIZE,
    pb.POLICY_ACTION_CULL,
    pb.POLICY_ACTION_ADJUST_LR,
    pb.POLICY_ACTION_PAUSE,
    pb.POLICY_ACTION_WIDEN,
    pb.POLICY_ACTION_DEEPEN,
)
# Growth proposals (a WIDEN or DEEPEN of a host layer, the last two of the head): the command factory turns
# them into `CommandFactory.growth` commands. The GNN picks their layer with a pointer over layer nodes.
GROWTH_ACTIONS: tuple[int, ...] = (pb.POLICY_ACTION_WIDEN, pb.POLICY_ACTION_DEEPEN)
# The amount head: the units a WIDEN may add, in head order. Which of them a run allows is settings
# (`TAMIYO_GNN_WIDEN_UNITS`) and the Urza catalogue's `op:widen` entry; the rest are masked.
WIDEN_UNITS: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
# The blend-mode head, in head order.
BLEND_MODES: tuple[int, ...] = (
    pb.BLEND_MODE_CONVEX,
    pb.BLEND_MODE_RESIDUAL,
    pb.BLEND_MODE_CHANNEL,
    pb.BLEND_MODE_CONFIDENCE,
)
# The schedule head: alpha ramp lengths in steps.
ALPHA_RAMP_STEPS: tuple[int, ...] = (8, 16, 32, 64)
# ADJUST_LR multiplies the learning rate by one of these.
LR_FACTORS: tuple[float, ...] = (0.5, 0.8, 1.25)


@dataclass(frozen=True)
class Proposal:
    """One decision of a policy, before the risk gates."""

    action: int
    slot_id: str = ""
    blueprint_id: str = ""
    blend_mode: int = pb.BLEND_MODE_CONVEX
    alpha_ramp_steps: int = ALPHA_RAMP_STEPS[1]
    lr_factor: float = 1.0
    reason: str = ""
    # A growth (GROWTH_ACTIONS): the host layer to widen or to deepen after (from the packet's topology),
    # WIDEN's new units and their initialisation, DEEPEN's hidden width (0: the layer's width).
    layer_id: str = ""
    units: int = 0
    growth_init: int = pb.GROWTH_INIT_GRADMAX
    hidden: int = 0
    # Learning signal for Simic: behaviour log-probability and value estimate. A policy that does not
    # sample (the heuristic) reports log_prob 0 (probability one) and value 0.
    log_prob: float = 0.0
    value: float = 0.0
    head_choices: dict[str, int] = field(default_factory=dict)
    head_log_probs: dict[str, float] = field(default_factory=dict)
    # The normaliser statistics of the graph the choice was sampled on (node type -> statistics; empty for
    # a policy without a graph): recorded with the decision, so Simic rebuilds the very same graph.
    normalized_with: dict[str, NormalizerState] = field(default_factory=dict)


class Policy(Protocol):
    """A decision rule Tamiyo can run: packet in, proposal out, with the state a resumed run needs.

    The service and the policy-update intake use nothing else of a policy; a graph policy adds
    `GraphPolicy`. A policy that keeps no state returns `{}` from `state` and accepts it in `restore`.
    """

    @property
    def version(self) -> str:
        """Identifies the policy's weights (recorded with every decision and field report)."""
        ...

    def propose(self, packet: pb.SystemStatePacket) -> Proposal:
        """Decide what to do for this packet."""
        ...

    def warm_up(self) -> CompileStatus | None:
        """Get ready before the first decision (compile, run on typical graphs); the compile status to
        report, or None for a policy with nothing to compile."""
        ...

    def state(self) -> dict[str, Any]:
        """JSON-ready run state (saved with Tolaria's checkpoints): what `restore` continues from."""
        ...

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a `state()` snapshot; a snapshot of another policy is refused with a typed error."""
        ...


class PolicyInferenceError(EsperError):
    """The policy could not produce a proposal; the caller sees it (no fallback command)."""

    def __init__(self, reason: str, *, compile_disabled: bool = False) -> None:
        self.reason = reason
        self.compile_disabled = compile_disabled
        super().__init__(f"policy inference failed: {reason}")


class Cancellation(Protocol):
    """What a policy checks between layers to abandon a decision that is already late."""

    def check(self) -> None:
        """Raise if the decision was cancelled."""
        ...


@runtime_checkable
class GraphPolicy(Protocol):
    """A policy that decides from a graph the service builds (the GNN); a plain `Policy` reads packets."""

    @property
    def version(self) -> str:
        """Identifies the weights."""
        ...

    @property
    def builder(self) -> GraphBuilder:
        """The graph builder whose schema the policy was built for."""
        ...

    def propose_graph(self, graph: TamiyoGraph, *, cancel: Cancellation | None = None) -> Proposal:
        """Decide for a built graph, checking `cancel` between layers."""
        ...

    def rehearse(self, graph: TamiyoGraph) -> None:
        """Run the network on a real graph without deciding (see `GNNPolicy.rehearse`)."""
        ...

    def warm(self, graph: TamiyoGraph, *, cancel: Cancellation) -> None:
        """Run the decision path's network on `graph`, changing nothing (see `GNNPolicy.warm`)."""
        ...

    @property
    def size(self) -> str:
        """The network's named size (`POLICY_SIZES`), or "custom"."""
        ...

    @property
    def compile_status(self) -> CompileStatus:
        """Compiled or eager, and why."""
        ...

    @property
    def plan_status(self) -> PlanStatus:
        """Whether the last rehearsed topology has a traced plan, and why not."""
        ...


@dataclass(frozen=True)
class CompileStatus:
    """Whether the GNN runs compiled, why not, and what warming it up cost (P2)."""

    enabled: bool
    reason: str
    warm_ms: float = 0.0
    fallbacks: int = 0


@dataclass(frozen=True)
class CaptureStatus:
    """Whether the decision forward of the current topology replays a CUDA graph (P7), and why not.

    `misses`: decisions whose graph did not fit the capture held (they ran the plan or the dense path)."""

    enabled: bool
    reason: str
    capture_ms: float = 0.0
    captures: int = 0
    fallbacks: int = 0
    misses: int = 0


@dataclass(frozen=True)
class PlanStatus:
    """Whether inference runs a traced plan of the dense path for the current topology, and why not;
    `capture` says the same of the CUDA graph."""

    enabled: bool
    reason: str
    build_ms: float = 0.0
    builds: int = 0
    fallbacks: int = 0
    capture: CaptureStatus = CaptureStatus(
        enabled=False, reason="disabled by settings (enable_cuda_graph=false)"
    )
