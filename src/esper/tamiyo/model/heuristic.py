# Over 500 lines: one policy, the rules of the growth lifecycle, which read one shared state.
"""The heuristic policy: the baseline Tamiyo runs until a trained GNN checkpoint exists.

Rules, in order of precedence (one decision per packet):

1. CULL a seed in SHADOWING or PROBATIONARY whose measured counterfactual contribution is clearly
   negative, or that has been stuck in that stage too long.
2. FOSSILIZE a seed in PROBATIONARY whose measured contribution is positive.
3. GERMINATE on a validation-loss plateau (the best loss of the last `plateau_patience` evaluations is not
   `min_improvement` better, relatively, than the best before them), at least `germination_cooldown`
   evaluations after the previous germination, while fewer than `max_active_seeds` seeds are active:
   into the DORMANT slot with the highest gradient norm (ties by slot order), with the first of
   `preferred_blueprints` the packet offers, or else the next blueprint of the offer in rotation. Under a
   growth budget (`packet.max_parameters`), a (slot, blueprint) whose seed would take the model past it is
   never proposed: the next blueprint, then the next slot, is tried, and at the budget the rule WAITs.

The defaults were chosen on development seeds (100-106) of benchmarks/growth_baselines.py, not on the
seeds it reports: a plateau is "less than 5% better over the last 2 evaluations" (with 1% over 3, hosts
grew only in the last third of a run, too late for a seed to pay), and `mlp_expand` (many new hidden
units behind the narrow layer) is preferred on MLP hosts, where it beat the rotation over all blueprints.
4. GROW (before GERMINATE, when `enable_growth`): after the same cooldown, while no seed and no growth is
   active, on a growth plateau (as rule 3's, with `growth_min_improvement`: a narrow host improves
   slowly but steadily, and waits for rule 3's plateau most of a run) or while growth pays (the last
   widen kept gained at least `min_gain_per_parameter`; with `grow_early`, also before any widen was
   judged, so the host grows from the first decision: a static network spends its compute at full
   size all along, a grown one is small first, and what it becomes is decided early):
   - WIDEN a layer the topology allows it for (`growth_operations`), whose slot is DORMANT (a widen merges
     into the host only past an empty slot) and that has no block after it: the narrowest first (the
     bottleneck), ties by its slot's gradient norm, then topology order; by `widen_fraction` of its width
     (at least one unit), new fan-in from gradient statistics (`widen_init`).
   - A layer stops widening when a widen of it was culled, or when the last one kept brought less than
     `min_gain_per_parameter` (its measured counterfactual validation-loss gain per added parameter,
     read when the heuristic fossilises it): more width there no longer pays.
   - DEEPEN after a layer that stopped widening (depth may pay where width did not), once per layer,
     when the topology allows it; the block is as wide as the layer.
   - Under a growth budget a growth that would pass it is never proposed (`growth_over_budget`). With no
     growth left to make, the rule falls through to GERMINATE.
   Growths are fossilised and culled by rules 1 and 2 as seeds are, from `packet.growth_states` (a growth
   is FOSSILIZEd only once Kasmina reports it `fossilize_ready`). Kasmina names a growth
   `<layer>:<w|d><n>`, which is how a growth's layer is read.
5. Otherwise WAIT.

Rules 3 and 4 start nothing once the run's `progress` (a training metric: the share of its steps done)
is past `last_growth_progress`: a growth or seed that cannot finish is terminated at the end of the run,
and a host that trained beside a blending seed loses accuracy when it is taken out.

A contribution counts only when Kasmina measured it (`contribution_measured == 1.0`); a missing metric is
unmeasured, and an unmeasured seed is never fossilised or culled on its contribution. Slot and blueprint ids
come from the packet only.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, TypeGuard

from esper.leyline import EsperError, pb, short_name
from esper.tamiyo.model.budget import (
    fits_slot,
    growth_over_budget,
    growth_parameter_cost,
    over_budget,
)
from esper.tamiyo.model.proposal import ALPHA_RAMP_STEPS, BLEND_MODES, Proposal
from esper.tamiyo.settings import TamiyoSettings

VERSION = "heuristic-v2"
# Snapshots `restore` accepts: v1 (before growth) restores with no growth history.
_RESTORABLE = (VERSION, "heuristic-v1")
WIDEN, DEEPEN = "widen", "deepen"
ENDED_STAGES = frozenset(
    {
        pb.SEED_STAGE_CULLED,
        pb.SEED_STAGE_EMBARGOED,
        pb.SEED_STAGE_RESETTING,
        pb.SEED_STAGE_TERMINATED,
    }
)

ACTIVE_STAGES = frozenset(
    {
        pb.SEED_STAGE_GERMINATED,
        pb.SEED_STAGE_TRAINING,
        pb.SEED_STAGE_BLENDING,
        pb.SEED_STAGE_SHADOWING,
        pb.SEED_STAGE_PROBATIONARY,
    }
)
JUDGED_STAGES = (pb.SEED_STAGE_SHADOWING, pb.SEED_STAGE_PROBATIONARY)


class HeuristicStateError(EsperError):
    """A saved heuristic state cannot be restored (wrong version, missing or ill-typed field)."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"heuristic policy state: {field} {reason}")


@dataclass(frozen=True)
class HeuristicSettings:
    """Thresholds of the heuristic policy, resolved once."""

    # Plateau detection, in evaluations (one packet is one evaluation).
    plateau_patience: int = 2
    min_improvement: float = 0.05
    germination_cooldown: int = 3
    max_active_seeds: int = 1
    # What a germination asks for: the first preferred blueprint offered, else the offer in rotation.
    preferred_blueprints: tuple[str, ...] = ("mlp_expand",)
    blend_mode: int = pb.BLEND_MODE_CONVEX
    alpha_ramp_steps: int = ALPHA_RAMP_STEPS[1]
    # Contribution judgement (contribution_loss in validation-loss units, accuracy as a fraction).
    cull_loss_margin: float = 0.01
    cull_accuracy_margin: float = 0.01
    fossilize_min_stage_steps: int = 0
    max_judged_stage_steps: int = 600
    # Growth (rule 4): widen by this fraction of a layer's width, stop a layer below this gain per
    # added parameter (validation loss, nats, per parameter); `grow_early`: grow from the first decision
    # while growth pays. `esper run` takes them from TamiyoSettings (TAMIYO_HEURISTIC_*).
    enable_growth: bool = False
    widen_fraction: float = 1.0
    widen_init: int = pb.GROWTH_INIT_GRADMAX
    min_gain_per_parameter: float = 1e-5
    growth_min_improvement: float = 0.10
    grow_early: bool = False
    last_growth_progress: float = 1.0
    # The share of the packet's growth budget (`max_parameters`) the rule grows to; 1: all of it.
    budget_fraction: float = 1.0

    def __post_init__(self) -> None:
        checks = {
            "plateau_patience": self.plateau_patience >= 1,
            "min_improvement": math.isfinite(self.min_improvement) and self.min_improvement >= 0,
            "germination_cooldown": self.germination_cooldown >= 0,
            "max_active_seeds": self.max_active_seeds >= 1,
            "blend_mode": self.blend_mode in BLEND_MODES,
            "alpha_ramp_steps": self.alpha_ramp_steps in ALPHA_RAMP_STEPS,
            "cull_loss_margin": math.isfinite(self.cull_loss_margin) and self.cull_loss_margin >= 0,
            "cull_accuracy_margin": math.isfinite(self.cull_accuracy_margin)
            and self.cull_accuracy_margin >= 0,
            "fossilize_min_stage_steps": self.fossilize_min_stage_steps >= 0,
            "max_judged_stage_steps": self.max_judged_stage_steps >= 1,
            "widen_fraction": math.isfinite(self.widen_fraction) and 0 < self.widen_fraction <= 4,
            "widen_init": self.widen_init in (pb.GROWTH_INIT_GRADMAX, pb.GROWTH_INIT_RANDOM),
            "min_gain_per_parameter": math.isfinite(self.min_gain_per_parameter)
            and self.min_gain_per_parameter >= 0,
            "growth_min_improvement": math.isfinite(self.growth_min_improvement)
            and self.growth_min_improvement >= 0,
            "last_growth_progress": 0 <= self.last_growth_progress <= 1,
            "budget_fraction": 0 < self.budget_fraction <= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid HeuristicSettings: {', '.join(bad)} ({self})")

    @classmethod
    def from_tamiyo(cls, settings: TamiyoSettings) -> HeuristicSettings:
        """The heuristic thresholds for a Tamiyo configuration: the defaults, with growth as the
        `TAMIYO_HEURISTIC_*` settings say."""
        return cls(
            enable_growth=settings.heuristic_growth,
            grow_early=settings.heuristic_grow_early,
            widen_fraction=settings.heuristic_widen_fraction,
            min_gain_per_parameter=settings.heuristic_min_gain_per_parameter,
            growth_min_improvement=settings.heuristic_growth_min_improvement,
            last_growth_progress=settings.heuristic_last_growth_progress,
            budget_fraction=settings.heuristic_budget_fraction,
        )


@dataclass(frozen=True)
class _Contribution:
    loss: float
    accuracy: float


def _metric(state: pb.SeedState, name: str) -> float | None:
    if name not in state.metrics:
        return None
    value = float(state.metrics[name])
    return value if math.isfinite(value) else None


def _measured_contribution(state: pb.SeedState) -> _Contribution | None:
    """The seed's counterfactual contribution, or None when it was not (fully) measured."""
    if _metric(state, "contribution_measured") != 1.0:
        return None
    loss = _metric(state, "contribution_loss")
    accuracy = _metric(state, "contribution_accuracy")
    if loss is None or accuracy is None:
        return None
    return _Contribution(loss=loss, accuracy=accuracy)


def _describe(state: pb.SeedState) -> str:
    stage = short_name(pb.SeedLifecycleStage, state.stage)
    if state.blueprint_id in (WIDEN, DEEPEN) and state.seed_id == state.slot_id:
        return f"growth {state.slot_id} ({state.blueprint_id}, {stage})"
    return f"seed {state.seed_id} in slot {state.slot_id} ({stage})"


def growth_layer(growth_id: str) -> str:
    """The host layer of a growth, from Kasmina's id `<layer>:<w|d><n>`."""
    return growth_id.rsplit(":", 1)[0]


class HeuristicPolicy:
    """Germinate on a plateau, fossilise what helps, cull what hurts; deterministic and checkpointable."""

    def __init__(self, settings: HeuristicSettings | TamiyoSettings) -> None:
        self.settings = (
            settings if isinstance(settings, HeuristicSettings) else HeuristicSettings.from_tamiyo(settings)
        )
        self._recent: deque[float] = deque(maxlen=self.settings.plateau_patience)
        self._best_before: float | None = None
        self._since_germination: int | None = None
        self._germinations = 0
        # Growth history: why a layer stopped widening, the last kept widen's gain per parameter, and
        # the layers a block was put after.
        self._widen_stopped: dict[str, str] = {}
        self._widen_gain: dict[str, float] = {}
        self._deepened: set[str] = set()
        self._last_gain: float | None = None

    @property
    def version(self) -> str:
        """The heuristic's rule-set version."""
        return VERSION

    def propose(self, packet: pb.SystemStatePacket) -> Proposal:
        """Decide for one evaluation packet (each call counts as one evaluation)."""
        self._observe(float(packet.validation_loss))
        self._observe_growths(packet)
        packet = self._within_own_budget(packet)
        return self._cull(packet) or self._fossilize(packet) or self._grow(packet) or self._germinate(packet)

    def _within_own_budget(self, packet: pb.SystemStatePacket) -> pb.SystemStatePacket:
        """`packet` as the rules see it: with `budget_fraction` of its growth budget (a copy), so every
        budget check of the rules (germinate, widen, deepen) stops at that share."""
        fraction = self.settings.budget_fraction
        if fraction >= 1.0 or not packet.max_parameters:
            return packet
        own = pb.SystemStatePacket()
        own.CopyFrom(packet)
        own.max_parameters = max(1, int(packet.max_parameters * fraction))
        return own

    # --- rules -------------------------------------------------------------------------------------

    def _cull(self, packet: pb.SystemStatePacket) -> Proposal | None:
        s = self.settings
        for state in [*packet.seed_states, *packet.growth_states]:
            if state.stage not in JUDGED_STAGES:
                continue
            contribution = _measured_contribution(state)
            if contribution is not None:
                hurts_loss = contribution.loss < -s.cull_loss_margin and contribution.accuracy <= 0
                hurts_accuracy = contribution.accuracy < -s.cull_accuracy_margin and contribution.loss <= 0
                if hurts_loss or hurts_accuracy:
                    self._growth_ended(state, "its widen was culled: it hurt")
                    return Proposal(
                        action=pb.POLICY_ACTION_CULL,
                        slot_id=state.slot_id,
                        reason=f"cull {_describe(state)}: removing it changes val loss by "
                        f"{-contribution.loss:+.4g} and accuracy by {-contribution.accuracy:+.4g}",
                    )
            stage_steps = _metric(state, "stage_steps")
            if stage_steps is not None and stage_steps > s.max_judged_stage_steps:
                self._growth_ended(state, "its widen was culled: stuck")
                return Proposal(
                    action=pb.POLICY_ACTION_CULL,
                    slot_id=state.slot_id,
                    reason=f"cull {_describe(state)}: stuck for {stage_steps:.0f} steps "
                    f"(limit {s.max_judged_stage_steps})",
                )
        return None

    def _fossilize(self, packet: pb.SystemStatePacket) -> Proposal | None:
        s = self.settings
        growths = {state.slot_id for state in packet.growth_states}
        for state in [*packet.seed_states, *packet.growth_states]:
            if state.stage != pb.SEED_STAGE_PROBATIONARY:
                continue
            contribution = _measured_contribution(state)
            if contribution is None or not (contribution.loss > 0 or contribution.accuracy > 0):
                continue
            growth = state.slot_id in growths
            if growth and _metric(state, "fossilize_ready") == 0.0:
                continue
            stage_steps = _metric(state, "stage_steps")
            if s.fossilize_min_stage_steps and (
                stage_steps is None or stage_steps < s.fossilize_min_stage_steps
            ):
                continue
            reason = (
                f"fossilize {_describe(state)}: it lowers val loss by {contribution.loss:.4g} "
                f"and raises accuracy by {contribution.accuracy:+.4g}"
            )
            added = _metric(state, "param_count")
            if growth and state.blueprint_id == WIDEN and added:
                gain = contribution.loss / added
                self._widen_gain[growth_layer(state.slot_id)] = gain
                self._last_gain = gain
                reason += f" ({gain:.3g} per added parameter)"
            return Proposal(action=pb.POLICY_ACTION_FOSSILIZE, slot_id=state.slot_id, reason=reason)
        return None

    def _grow(self, packet: pb.SystemStatePacket) -> Proposal | None:
        """Rule 4: a WIDEN or DEEPEN on a plateau, or None to fall through to GERMINATE."""
        s = self.settings
        if not s.enable_growth or self._too_late(packet) is not None:
            return None
        plateau, plateau_reason = self._plateau(s.growth_min_improvement)
        if not plateau and self._last_gain is not None and self._last_gain >= s.min_gain_per_parameter:
            plateau, plateau_reason = (
                True,
                f"growth pays: the last widen gained {self._last_gain:.3g} per parameter",
            )
        elif not plateau and s.grow_early and not (self._widen_gain or self._widen_stopped):
            plateau, plateau_reason = True, "growing early: no widen has been judged yet"
        if not plateau:
            return None
        if self._since_germination is not None and self._since_germination < s.germination_cooldown:
            return None
        active = [
            state.slot_id
            for state in [*packet.seed_states, *packet.growth_states]
            if state.stage in ACTIVE_STAGES
        ]
        if active:
            return None
        # At the budget nothing here is proposed and the rule falls through to GERMINATE (which checks it).
        for layer in self._widen_candidates(packet):
            units = max(1, round(s.widen_fraction * layer.width))
            if growth_over_budget(packet, pb.POLICY_ACTION_WIDEN, layer.layer_id, units=units):
                continue
            added, _ = growth_parameter_cost(packet, pb.POLICY_ACTION_WIDEN, layer.layer_id, units=units)
            self._grew()
            return Proposal(
                action=pb.POLICY_ACTION_WIDEN,
                layer_id=layer.layer_id,
                units=units,
                growth_init=s.widen_init,
                alpha_ramp_steps=s.alpha_ramp_steps,
                reason=f"widen {layer.layer_id} from {layer.width} by {units} "
                f"({added} parameters): {plateau_reason}",
            )
        for layer in self._deepen_candidates(packet):
            if growth_over_budget(packet, pb.POLICY_ACTION_DEEPEN, layer.layer_id):
                continue
            self._grew()
            self._deepened.add(layer.layer_id)
            why_not_widen = self._widen_stopped.get(layer.layer_id, "the host cannot widen it")
            return Proposal(
                action=pb.POLICY_ACTION_DEEPEN,
                layer_id=layer.layer_id,
                alpha_ramp_steps=s.alpha_ramp_steps,
                reason=f"deepen after {layer.layer_id} ({why_not_widen}): {plateau_reason}",
            )
        return None

    def _widen_candidates(self, packet: pb.SystemStatePacket) -> list[pb.LayerDescriptor]:
        slot_stage = {
            slot.layer_id: state.stage
            for slot in packet.topology.slots
            for state in packet.seed_states
            if state.slot_id == slot.slot_id
        }
        slot_gradient = {
            slot.layer_id: state.gradient_norm
            for slot in packet.topology.slots
            for state in packet.seed_states
            if state.slot_id == slot.slot_id and math.isfinite(state.gradient_norm)
        }
        blocked = {
            growth_layer(state.slot_id)
            for state in packet.growth_states
            if state.blueprint_id == DEEPEN and state.stage not in ENDED_STAGES
        }
        candidates = [
            (index, layer)
            for index, layer in enumerate(packet.topology.layers)
            if pb.SEED_OP_WIDEN in layer.growth_operations
            and layer.width >= 1
            and slot_stage.get(layer.layer_id, pb.SEED_STAGE_DORMANT) == pb.SEED_STAGE_DORMANT
            and layer.layer_id not in blocked
            and layer.layer_id not in self._deepened
            and not self._stop_widening(layer.layer_id)
        ]
        candidates.sort(key=lambda item: (item[1].width, -slot_gradient.get(item[1].layer_id, 0.0), item[0]))
        return [layer for _, layer in candidates]

    def _deepen_candidates(self, packet: pb.SystemStatePacket) -> list[pb.LayerDescriptor]:
        return [
            layer
            for layer in packet.topology.layers
            if pb.SEED_OP_DEEPEN in layer.growth_operations
            and layer.layer_id not in self._deepened
            and (self._stop_widening(layer.layer_id) or pb.SEED_OP_WIDEN not in layer.growth_operations)
        ]

    def _stop_widening(self, layer_id: str) -> bool:
        """True (and the reason kept) once widening `layer_id` no longer pays."""
        if layer_id in self._widen_stopped:
            return True
        gain = self._widen_gain.get(layer_id)
        if gain is not None and gain < self.settings.min_gain_per_parameter:
            self._widen_stopped[layer_id] = (
                f"its last widen gained {gain:.3g} per parameter < {self.settings.min_gain_per_parameter:g}"
            )
            return True
        return False

    def _grew(self) -> None:
        self._germinations += 1
        self._since_germination = 0

    def _observe_growths(self, packet: pb.SystemStatePacket) -> None:
        for state in packet.growth_states:
            if state.stage in ENDED_STAGES:
                self._growth_ended(state, "its widen was culled")

    def _growth_ended(self, state: pb.SeedState, reason: str) -> None:
        """A culled widen stops its layer widening (a culled block is not tried again either)."""
        if state.blueprint_id == WIDEN and state.seed_id == state.slot_id:
            self._widen_stopped.setdefault(growth_layer(state.slot_id), reason)
            self._last_gain = None

    def _too_late(self, packet: pb.SystemStatePacket) -> str | None:
        """Why nothing new may start this late in the run, or None."""
        progress = packet.training_metrics.get("progress")
        if progress is not None and progress > self.settings.last_growth_progress:
            return (
                f"{progress:.0%} of the run is done (past {self.settings.last_growth_progress:.0%}): "
                "a growth started now could not finish"
            )
        return None

    def _germinate(self, packet: pb.SystemStatePacket) -> Proposal:  # noqa: PLR0911 (each reason not to germinate returns its own WAIT)
        s = self.settings
        late = self._too_late(packet)
        if late is not None:
            return self._wait(late)
        plateau, plateau_reason = self._plateau()
        if not plateau:
            return self._wait(plateau_reason)
        if self._since_germination is not None and self._since_germination < s.germination_cooldown:
            return self._wait(
                f"{plateau_reason}, but only {self._since_germination} evaluation(s) since the last "
                f"germination (cooldown {s.germination_cooldown})"
            )
        active = sum(
            1 for state in [*packet.seed_states, *packet.growth_states] if state.stage in ACTIVE_STAGES
        )
        if active >= s.max_active_seeds:
            return self._wait(f"{plateau_reason}, but {active} seed(s) active (limit {s.max_active_seeds})")
        slots = self._dormant_by_promise(packet)
        if not slots:
            return self._wait(f"{plateau_reason}, but no DORMANT slot is available")
        if not packet.blueprint_ids:
            return self._wait(f"{plateau_reason}, but the packet offers no blueprint")
        offered = list(packet.blueprint_ids)
        preferred = [b for b in s.preferred_blueprints if b in offered]
        rotation = [offered[(self._germinations + i) % len(offered)] for i in range(len(offered))]
        candidates = list(dict.fromkeys(preferred + rotation))
        refusal = ""
        described = {d.slot_id: d for d in packet.topology.slots}
        for slot in slots:
            where = described.get(slot.slot_id)
            for blueprint_id in candidates:
                # A host with Linear and Conv points offers blueprints of both kinds: each slot takes its own.
                if where is not None and not fits_slot(blueprint_id, int(where.width), str(where.kind)):
                    continue
                reason = over_budget(packet, slot.slot_id, blueprint_id, s.blend_mode)
                if reason is not None:
                    refusal = refusal or reason
                    continue
                self._germinations += 1
                self._since_germination = 0
                return Proposal(
                    action=pb.POLICY_ACTION_GERMINATE,
                    slot_id=slot.slot_id,
                    blueprint_id=blueprint_id,
                    blend_mode=s.blend_mode,
                    alpha_ramp_steps=s.alpha_ramp_steps,
                    reason=f"germinate {blueprint_id} in slot {slot.slot_id} "
                    f"(gradient norm {slot.gradient_norm:.4g}): {plateau_reason}",
                )
        if not refusal:
            return self._wait(f"{plateau_reason}, but no offered blueprint fits a dormant slot's kind")
        return self._wait(f"{plateau_reason}, but no germination fits the growth budget ({refusal})")

    def _wait(self, reason: str) -> Proposal:
        return Proposal(action=pb.POLICY_ACTION_WAIT, reason=f"wait: {reason}")

    # --- helpers -----------------------------------------------------------------------------------

    def _observe(self, validation_loss: float) -> None:
        if len(self._recent) == self._recent.maxlen:
            oldest = self._recent[0]
            self._best_before = oldest if self._best_before is None else min(self._best_before, oldest)
        self._recent.append(validation_loss)
        if self._since_germination is not None:
            self._since_germination += 1

    def _plateau(self, min_improvement: float | None = None) -> tuple[bool, str]:
        threshold = self.settings.min_improvement if min_improvement is None else min_improvement
        patience = self.settings.plateau_patience
        if self._best_before is None or len(self._recent) < patience:
            return False, f"not enough history for a plateau (need {patience + 1} evaluations)"
        best_recent = min(self._recent)
        improvement = (self._best_before - best_recent) / max(abs(self._best_before), 1e-12)
        summary = (
            f"best val loss of the last {patience} evaluations {best_recent:.4g} vs {self._best_before:.4g} "
            f"before ({improvement:+.2%})"
        )
        if improvement > threshold:
            return False, f"still improving: {summary}"
        return True, f"plateau: {summary}"

    @staticmethod
    def _dormant_by_promise(packet: pb.SystemStatePacket) -> list[pb.SeedState]:
        topology_order = {slot.slot_id: index for index, slot in enumerate(packet.topology.slots)}
        dormant = [
            (index, state)
            for index, state in enumerate(packet.seed_states)
            if state.stage == pb.SEED_STAGE_DORMANT and state.slot_id
        ]

        def rank(item: tuple[int, pb.SeedState]) -> tuple[float, int, int]:
            index, state = item
            gradient = state.gradient_norm if math.isfinite(state.gradient_norm) else -math.inf
            return (-gradient, topology_order.get(state.slot_id, len(topology_order)), index)

        return [state for _, state in sorted(dormant, key=rank)]

    # --- checkpointing -----------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Rules have nothing to compile or warm up."""
        return None

    def state(self) -> dict[str, Any]:
        """JSON-ready state, enough for `restore` to continue exactly where this policy is."""
        return {
            "version": VERSION,
            "recent_losses": list(self._recent),
            "best_before": self._best_before,
            "evaluations_since_germination": self._since_germination,
            "germinations": self._germinations,
            "widen_stopped": dict(self._widen_stopped),
            "widen_gain": dict(self._widen_gain),
            "deepened": sorted(self._deepened),
            "last_gain": self._last_gain,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a `state()` snapshot; a malformed one raises `HeuristicStateError`."""
        if state.get("version") not in _RESTORABLE:
            raise HeuristicStateError(
                "version", f"is {state.get('version')!r}, expected one of {_RESTORABLE}"
            )
        losses = state.get("recent_losses")
        if not isinstance(losses, list) or not all(_is_finite_number(x) for x in losses):
            raise HeuristicStateError("recent_losses", f"must be a list of finite numbers, got {losses!r}")
        if len(losses) > self.settings.plateau_patience:
            raise HeuristicStateError(
                "recent_losses", f"holds {len(losses)} values, patience is {self.settings.plateau_patience}"
            )
        best_before = state.get("best_before")
        if best_before is not None and not _is_finite_number(best_before):
            raise HeuristicStateError("best_before", f"must be a finite number or null, got {best_before!r}")
        since = state.get("evaluations_since_germination")
        if since is not None and not _is_count(since):
            raise HeuristicStateError(
                "evaluations_since_germination", f"must be a count or null, got {since!r}"
            )
        germinations = state.get("germinations")
        if not _is_count(germinations):
            raise HeuristicStateError("germinations", f"must be a count, got {germinations!r}")
        stopped = state.get("widen_stopped", {})
        if not isinstance(stopped, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in stopped.items()
        ):
            raise HeuristicStateError("widen_stopped", f"must map layer ids to reasons, got {stopped!r}")
        gains = state.get("widen_gain", {})
        if not isinstance(gains, dict) or not all(
            isinstance(k, str) and _is_finite_number(v) for k, v in gains.items()
        ):
            raise HeuristicStateError("widen_gain", f"must map layer ids to finite numbers, got {gains!r}")
        deepened = state.get("deepened", [])
        if not isinstance(deepened, list) or not all(isinstance(k, str) for k in deepened):
            raise HeuristicStateError("deepened", f"must be a list of layer ids, got {deepened!r}")
        self._widen_stopped = dict(stopped)
        self._widen_gain = {k: float(v) for k, v in gains.items()}
        last_gain = state.get("last_gain")
        if last_gain is not None and not _is_finite_number(last_gain):
            raise HeuristicStateError("last_gain", f"must be a finite number or null, got {last_gain!r}")
        self._deepened = set(deepened)
        self._last_gain = None if last_gain is None else float(last_gain)
        self._recent = deque((float(x) for x in losses), maxlen=self.settings.plateau_patience)
        self._best_before = None if best_before is None else float(best_before)
        self._since_germination = since
        self._germinations = germinations


def _is_finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


WAIT_ONLY_VERSION = "wait-only-v1"


class WaitOnlyPolicy:
    """The no-growth control (DESIGN §10 "baselines run side by side"): every decision is WAIT, so the
    host trains with its slots dormant under exactly the same loop as a grown run."""

    @property
    def version(self) -> str:
        """The control's version."""
        return WAIT_ONLY_VERSION

    def propose(self, packet: pb.SystemStatePacket) -> Proposal:
        """WAIT, whatever the packet says."""
        del packet
        return Proposal(action=pb.POLICY_ACTION_WAIT, reason="wait: the no-growth control never grows")

    def warm_up(self) -> None:
        """Rules have nothing to compile or warm up."""
        return None

    def state(self) -> dict[str, Any]:
        """The control has no state beyond its version."""
        return {"version": WAIT_ONLY_VERSION}

    def restore(self, state: dict[str, Any]) -> None:
        """Check the snapshot is the control's own."""
        if state.get("version") != WAIT_ONLY_VERSION:
            raise HeuristicStateError(
                "version", f"is {state.get('version')!r}, expected {WAIT_ONLY_VERSION!r}"
            )
