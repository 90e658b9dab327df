"""GNNPolicy: the heterogeneous GNN behind the `Policy` protocol, for inference and for Simic.

The factored choice is action -> (slot, blueprint, blend mode, schedule) or (slot) or (lr factor) or
(layer, amount) for a WIDEN or (layer) for a DEEPEN, depending on the action. Only the heads that matter
for the chosen action count in the log-probability, the entropy and `head_choices` (DESIGN §10: per-head
credit). Illegal actions and targets are masked
before sampling: no FOSSILIZE without a seed in PROBATIONARY, no CULL without an active seed, no
GERMINATE without a dormant slot and an offered blueprint, no WIDEN or DEEPEN of a layer that cannot grow
or past the growth budget, no widen amount the settings, the catalogue or the budget do not allow.

Weights are saved as safetensors with a JSON header naming the architecture and schema; a checkpoint for
another architecture is refused. Compilation (P2) is optional, warmed up, and its fallback is reported.
"""

from __future__ import annotations

import base64
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from esper.leyline import pb
from esper.tamiyo.model.builder import GraphBuilder
from esper.tamiyo.model.checkpoint import CheckpointIncompatible
from esper.tamiyo.model.cudagraph import cuda_graphs_available
from esper.tamiyo.model.distributions import (
    MASKED,
    RELEVANT_HEADS,
    ActionEvaluation,
    evaluate_choices,
)
from esper.tamiyo.model.gnn import (
    TamiyoGNN,
    TamiyoGNNConfig,
)
from esper.tamiyo.model.graph import TamiyoGraph, collate
from esper.tamiyo.model.normalizer_state import NormalizerState, NormalizerStore
from esper.tamiyo.model.outputs import GNNOutput
from esper.tamiyo.model.plan import PlanError
from esper.tamiyo.model.proposal import (
    ACTIONS,
    ALPHA_RAMP_STEPS,
    BLEND_MODES,
    LR_FACTORS,
    WIDEN_UNITS,
    Cancellation,
    CaptureStatus,
    CompileStatus,
    PlanStatus,
    PolicyInferenceError,
    Proposal,
)
from esper.tamiyo.model.schema import TAMIYO_SCHEMA, BlueprintLookup, GraphSchema, GraphSchemaError
from esper.tamiyo.model.warmup import warmup_graphs
from esper.tamiyo.model.weights import decode_weights, encode_weights, weights_version
from esper.tamiyo.settings import TamiyoSettings


class GNNPolicy:
    """The GNN controller: implements `Policy` (and `GraphPolicy`), with a PPO-facing evaluation API."""

    def __init__(
        self,
        settings: TamiyoSettings,
        *,
        seed: int | None = None,
        schema: GraphSchema = TAMIYO_SCHEMA,
        config: TamiyoGNNConfig | None = None,
        normalizer_store: NormalizerStore | None = None,
        blueprint_metadata: BlueprintLookup | None = None,
        greedy: bool | None = None,
        compiler: Callable[[torch.nn.Module], Callable[..., GNNOutput]] | None = None,
        builder: GraphBuilder | None = None,
    ) -> None:
        self._settings = settings
        # Without an explicit config, the deployment's size (TAMIYO_POLICY_SIZE).
        self._config = config or TamiyoGNNConfig.sized(settings.policy_size, schema)
        if self._config.schema != schema:
            raise CheckpointIncompatible("schema_version", schema.version, self._config.schema.version)
        # A candidate policy (P3) shares the serving policy's builder: same normaliser, same catalogue.
        self._builder = builder or GraphBuilder(
            settings, schema=schema, normalizer_store=normalizer_store, blueprint_metadata=blueprint_metadata
        )
        if self._builder.schema != schema:
            raise CheckpointIncompatible("schema_version", schema.version, self._builder.schema.version)
        seed = settings.gnn_seed if seed is None else seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.module = TamiyoGNN(self._config)
        self.module.to(torch.device(settings.device)).eval()
        self._generator = torch.Generator().manual_seed(seed)
        self._greedy = settings.gnn_greedy if greedy is None else greedy
        self._version = self._weights_version()
        self._forward: Callable[..., GNNOutput] = self.module
        self._compiler = compiler
        self._compile = CompileStatus(enabled=False, reason="disabled by settings (enable_compile=false)")
        if settings.enable_compile and compiler is None:
            self._compiler = torch.compile
        self._plan = PlanStatus(
            enabled=False,
            reason="no topology rehearsed yet"
            if settings.enable_plan
            else "disabled by settings (enable_plan=false)",
        )
        if settings.enable_cuda_graph:
            self._plan = dataclasses.replace(
                self._plan, capture=CaptureStatus(enabled=False, reason="no topology rehearsed yet")
            )

    # -- identity and persistence -------------------------------------------------------------------

    @property
    def version(self) -> str:
        """`gnn-<architecture>-<weights hash>`: changes whenever the weights do."""
        return self._version

    @property
    def builder(self) -> GraphBuilder:
        """The graph builder for this policy's schema."""
        return self._builder

    @property
    def config(self) -> TamiyoGNNConfig:
        """The network's sizes and schema."""
        return self._config

    @property
    def size(self) -> str:
        """The network's named size (`POLICY_SIZES`), or "custom"."""
        return self._config.size

    @property
    def compile_status(self) -> CompileStatus:
        """Compiled or eager, and why."""
        return self._compile

    @property
    def plan_status(self) -> PlanStatus:
        """Whether the last rehearsed topology has a traced plan, and why not."""
        return self._plan

    def _weights_version(self) -> str:
        return weights_version(self.state_bytes())

    def state_bytes(self) -> bytes:
        """The weights as safetensors bytes with the JSON header (the `PolicyUpdate` payload format)."""
        return encode_weights(self.module, self._config)

    def load_state_bytes(self, payload: bytes) -> None:
        """Load weights from `state_bytes()` output of a compatible policy; anything else is refused with
        `CheckpointIncompatible`, and the weights stay as they were."""
        tensors = decode_weights(payload, self.module, self._config)
        self.module.drop_plan()  # it computes the old weights (its weights check would refuse it anyway)
        self.module.load_state_dict(tensors, strict=True)
        self.module.eval()
        self._version = self._weights_version()

    def state(self) -> dict[str, Any]:
        """JSON-ready run state (saved with Tolaria's checkpoints): the weights' version and the sampler."""
        generator = base64.b64encode(self._generator.get_state().numpy().tobytes()).decode("ascii")
        # The normaliser's statistics decide too: saved exactly (JSON floats round-trip), not only at
        # its periodic store flushes.
        normalizer = {name: asdict(state) for name, state in self._builder.normalizer.states().items()}
        return {"policy": "gnn", "version": self._version, "generator": generator, "normalizer": normalizer}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a `state()` snapshot; weights of another version are refused, never mixed."""
        if state.get("policy") != "gnn":
            raise CheckpointIncompatible("policy", "gnn", str(state.get("policy")))
        if state.get("version") != self._version:
            raise CheckpointIncompatible("version", str(state.get("version")), self._version)
        encoded = state.get("generator")
        if not isinstance(encoded, str):
            raise CheckpointIncompatible("generator", "a base64 sampler state", type(encoded).__name__)
        try:
            raw = base64.b64decode(encoded, validate=True)
            self._generator.set_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
        except (ValueError, RuntimeError) as exc:
            raise CheckpointIncompatible("generator", "a valid sampler state", str(exc)) from exc
        saved = state.get("normalizer")
        if saved is None:
            return  # a state saved before the statistics were checkpointed
        try:
            states = {
                str(name): NormalizerState(
                    [float(v) for v in entry["count"]],
                    [float(v) for v in entry["mean"]],
                    [float(v) for v in entry["m2"]],
                )
                for name, entry in dict(saved).items()
            }
            self._builder.normalizer.load_states(states)
        except (TypeError, ValueError, KeyError, GraphSchemaError) as exc:
            raise CheckpointIncompatible(
                "normalizer", "normaliser statistics of this schema", str(exc)
            ) from exc

    def save(self, path: Path) -> None:
        """Write the weights and header to `path` (safetensors; never pickle)."""
        path.write_bytes(self.state_bytes())

    @classmethod
    def load(cls, path: Path, settings: TamiyoSettings, **kwargs: Any) -> GNNPolicy:
        """A policy with the weights of `path`; the header must match this architecture and schema."""
        policy = cls(settings, **kwargs)
        policy.load_state_bytes(path.read_bytes())
        return policy

    # -- compile and warm-up ------------------------------------------------------------------------

    def warm_up(self, sizes: Sequence[tuple[int, int, int]] = ((8, 4, 4), (48, 16, 8))) -> CompileStatus:
        """Run the network on graphs of typical sizes (compiling first when enabled) before deciding.

        A compile failure falls back to eager; the returned status says so and why, and the caller
        reports it. Warm-up graphs are synthetic and never become commands.
        """
        graphs = warmup_graphs(self._settings, self._config.schema, sizes)
        if self._compiler is not None and not self._compile.enabled:
            start = time.perf_counter()
            try:
                compiled = self._compiler(self.module)
                with torch.inference_mode():
                    for graph in graphs:
                        compiled(graph)
            except Exception as exc:  # noqa: BLE001 (any compile failure -> eager, reported by the caller)
                self._forward = self.module
                self._compile = CompileStatus(
                    enabled=False,
                    reason=f"compile failed: {type(exc).__name__}: {exc}",
                    fallbacks=self._compile.fallbacks + 1,
                )
            else:
                self._forward = compiled
                warm_ms = (time.perf_counter() - start) * 1e3
                self._compile = CompileStatus(enabled=True, reason="compiled", warm_ms=warm_ms)
        if not self._compile.enabled:
            with torch.inference_mode():
                for graph in graphs:
                    self.module(graph)
        return self._compile

    def _one_graph_in_eval(self, graph: TamiyoGraph, caller: str) -> None:
        """What every single-graph inference entry point requires: one graph, the module in eval mode."""
        if graph.num_graphs != 1:
            raise PolicyInferenceError(f"{caller} takes one graph, got a batch of {graph.num_graphs}")
        if self.module.training:
            self.module.eval()

    def _run(self, graph: TamiyoGraph, cancel: Cancellation | None) -> GNNOutput:
        checkpoint = cancel.check if cancel is not None else None
        if self._compile.enabled:
            try:
                return self._forward(graph)  # type: ignore[no-any-return,unused-ignore]
            except Exception as exc:
                self._forward = self.module
                self._compile = CompileStatus(
                    enabled=False,
                    reason=f"compiled forward failed: {type(exc).__name__}: {exc}",
                    warm_ms=self._compile.warm_ms,
                    fallbacks=self._compile.fallbacks + 1,
                )
                raise PolicyInferenceError(self._compile.reason, compile_disabled=True) from exc
        if checkpoint is None:
            return self.module.forward(graph)
        return self.module.forward(graph, checkpoint)

    # -- deciding -----------------------------------------------------------------------------------

    def propose(self, packet: pb.SystemStatePacket) -> Proposal:
        """The `Policy` protocol: build the graph of `packet` and decide."""
        return self.propose_graph(self._builder.build(packet))

    def rehearse(self, graph: TamiyoGraph) -> None:
        """Run the network on `graph` without deciding: nothing is sampled and no state a decision reads
        changes, but the work a first decision on this graph's topology would do (its dense blocks, the
        packed weights) is done here, outside the decision deadline. Then, unless compiled or disabled,
        trace the dense path for this topology (`TamiyoGNN.build_plan`); a plan that cannot be built
        leaves the dense path serving, and `plan_status` says why."""
        self._one_graph_in_eval(graph, "rehearse")
        with torch.inference_mode():
            self._run(graph, None)
        if self._compile.enabled:
            return
        if self._settings.enable_plan:
            status = self._plan
            try:
                build_ms = self.module.build_plan(graph)
            except (PlanError, RuntimeError) as exc:  # RuntimeError: TorchScript could not trace or freeze
                self._plan = PlanStatus(
                    enabled=False,
                    reason=f"plan failed: {type(exc).__name__}: {exc}",
                    builds=status.builds,
                    fallbacks=status.fallbacks + 1,
                    capture=status.capture,
                )
            else:
                self._plan = PlanStatus(
                    enabled=True,
                    reason="traced",
                    build_ms=build_ms,
                    builds=status.builds + 1,
                    fallbacks=status.fallbacks,
                    capture=status.capture,
                )
        if self._settings.enable_cuda_graph:
            self._rehearse_capture(graph)

    def _rehearse_capture(self, graph: TamiyoGraph) -> None:
        """P7: capture the decision forward of `graph`'s topology in a CUDA graph. Off CUDA the status
        says "not available" (no fallback counted); a capture that fails is a fallback, with its reason."""
        status = self._plan.capture
        misses = self.module.capture_misses
        unavailable = cuda_graphs_available(self.module.device)
        if unavailable:
            capture = CaptureStatus(enabled=False, reason=unavailable, misses=misses)
        else:
            try:
                capture_ms = self.module.capture_graph(graph)
            except (PlanError, RuntimeError) as exc:  # CaptureUnavailable is a PlanError
                capture = dataclasses.replace(
                    status,
                    enabled=False,
                    reason=f"capture failed: {type(exc).__name__}: {exc}",
                    fallbacks=status.fallbacks + 1,
                    misses=misses,
                )
            else:
                capture = dataclasses.replace(
                    status,
                    enabled=True,
                    reason="captured",
                    capture_ms=capture_ms,
                    captures=status.captures + 1,
                    misses=misses,
                )
        self._plan = dataclasses.replace(self._plan, capture=capture)

    def warm(self, graph: TamiyoGraph, *, cancel: Cancellation) -> None:
        """Run the network on `graph` as a decision would, checking `cancel` between layers, and keep
        nothing: no sampling (the random stream is untouched), no plan traced, no state changed. The
        service runs it on the inference thread shortly before a decision, so that the decision finds
        that core's caches holding the network's weights and code (and the service times it, at start, to
        see whether the policy fits the step budget on this machine)."""
        self._one_graph_in_eval(graph, "warm")
        with torch.inference_mode():
            out = self._run(graph, cancel)
        if out.action_logits.device.type == "cuda":
            torch.cuda.synchronize(out.action_logits.device)  # returns when the work is done, not queued

    def propose_graph(self, graph: TamiyoGraph, *, cancel: Cancellation | None = None) -> Proposal:
        """Decide for one graph: sample (or take the argmax when greedy) each head that matters."""
        self._one_graph_in_eval(graph, "propose_graph")
        with torch.inference_mode():
            out = self._run(graph, cancel)
            # Only the heads that matter for the chosen action are normalised (the same log-probabilities
            # `head_distributions` gives Simic, computed for one graph and only where needed).
            action_lp = torch.log_softmax(
                out.action_logits[0].masked_fill(~graph.action_mask[0].to(out.action_logits.device), MASKED),
                dim=-1,
            )
            action = self._choose(action_lp)
            choices: dict[str, int] = {"action": action}
            log_probs: dict[str, Tensor] = {"action": action_lp[action]}
            relevant = RELEVANT_HEADS[action]
            if "slot" in relevant:
                slot_ok = graph.slot_action_mask[:, action].to(out.slot_scores.device)
                slot_lp = torch.log_softmax(out.slot_scores.masked_fill(~slot_ok, MASKED), dim=0)
                choices["slot"] = self._choose(slot_lp)
                log_probs["slot"] = slot_lp[choices["slot"]]
            if "blueprint" in relevant:
                blueprint_lp = torch.log_softmax(out.blueprint_scores, dim=0)
                choices["blueprint"] = self._choose(blueprint_lp)
                log_probs["blueprint"] = blueprint_lp[choices["blueprint"]]
            if "layer" in relevant:
                layer_ok = graph.layer_action_mask[:, action].to(out.layer_scores.device)
                layer_lp = torch.log_softmax(out.layer_scores.masked_fill(~layer_ok, MASKED), dim=0)
                choices["layer"] = self._choose(layer_lp)
                log_probs["layer"] = layer_lp[choices["layer"]]
            if "amount" in relevant:
                amount_ok = graph.widen_amount_mask[choices["layer"]].to(out.amount_logits.device)
                amount_lp = torch.log_softmax(out.amount_logits[0].masked_fill(~amount_ok, MASKED), dim=-1)
                choices["amount"] = self._choose(amount_lp)
                log_probs["amount"] = amount_lp[choices["amount"]]
            for head, logits in (
                ("blend", out.blend_logits),
                ("schedule", out.schedule_logits),
                ("lr", out.lr_logits),
            ):
                if head in relevant:
                    head_lp = torch.log_softmax(logits[0], dim=-1)
                    choices[head] = self._choose(head_lp)
                    log_probs[head] = head_lp[choices[head]]
            numbers = torch.stack([*log_probs.values(), out.value[0]]).tolist()
            head_log_probs = dict(zip(log_probs, numbers[:-1], strict=True))
            value = numbers[-1]
        for head, log_prob in head_log_probs.items():
            if log_prob <= MASKED / 2:
                raise PolicyInferenceError(f"head {head} chose a masked option (log-prob {log_prob})")
        return Proposal(
            action=ACTIONS[action],
            slot_id=graph.slot_ids[choices["slot"]] if "slot" in choices else "",
            blueprint_id=graph.blueprint_ids[choices["blueprint"]] if "blueprint" in choices else "",
            blend_mode=BLEND_MODES[choices.get("blend", 0)],
            alpha_ramp_steps=ALPHA_RAMP_STEPS[choices.get("schedule", 1)],
            lr_factor=LR_FACTORS[choices["lr"]] if "lr" in choices else 1.0,
            layer_id=graph.layer_ids[choices["layer"]] if "layer" in choices else "",
            units=WIDEN_UNITS[choices["amount"]] if "amount" in choices else 0,
            reason="gnn",
            log_prob=sum(head_log_probs.values()),
            value=value,
            head_choices=choices,
            head_log_probs=head_log_probs,
            normalized_with=graph.normalized_with or {},
        )

    def _choose(self, log_probs: Tensor) -> int:
        if log_probs.numel() == 0:
            raise PolicyInferenceError("a head that matters has no options")
        if self._greedy:
            return int(log_probs.argmax())
        return int(torch.multinomial(log_probs.exp(), 1, generator=self._generator))

    # -- learning (Simic) ---------------------------------------------------------------------------

    def evaluate_actions(
        self, graphs: Sequence[TamiyoGraph], head_choices: Sequence[dict[str, int]]
    ) -> ActionEvaluation:
        """Per-head log-probs, entropies and values of recorded choices, with gradients (train mode).

        `head_choices[i]` is the `Proposal.head_choices` of graph i: indices local to that graph.
        A head counts only where it mattered for the recorded action.
        """
        if len(graphs) != len(head_choices):
            raise ValueError(f"{len(graphs)} graphs but {len(head_choices)} choice sets")
        batch = collate(graphs)
        out = self.module(batch)
        return evaluate_choices(out, batch, head_choices)
