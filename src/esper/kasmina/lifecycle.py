"""The seed lifecycle: twelve stages, the legal moves between them, and gates G0-G5 on measured signals.

`SeedLifecycle` is pure bookkeeping (no tensors): the slot measures, the manager feeds the measurements in,
and `advance` moves the seed at most one gate per call. A gate whose signal has not been measured waits;
unmeasured is never healthy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from esper.kasmina.settings import KasminaSettings
from esper.leyline import EsperError, pb, short_name

DORMANT = pb.SEED_STAGE_DORMANT
GERMINATED = pb.SEED_STAGE_GERMINATED
TRAINING = pb.SEED_STAGE_TRAINING
BLENDING = pb.SEED_STAGE_BLENDING
SHADOWING = pb.SEED_STAGE_SHADOWING
PROBATIONARY = pb.SEED_STAGE_PROBATIONARY
FOSSILIZED = pb.SEED_STAGE_FOSSILIZED
CULLED = pb.SEED_STAGE_CULLED
EMBARGOED = pb.SEED_STAGE_EMBARGOED
RESETTING = pb.SEED_STAGE_RESETTING
TERMINATED = pb.SEED_STAGE_TERMINATED

# Stages in which a seed module lives in the slot and may be culled.
ACTIVE_STAGES = frozenset({GERMINATED, TRAINING, BLENDING, SHADOWING, PROBATIONARY})
# Stages in which the seed's output reaches the host's output.
BLEND_STAGES = frozenset({BLENDING, SHADOWING, PROBATIONARY, FOSSILIZED})

LEGAL_TRANSITIONS: dict[int, frozenset[int]] = {
    DORMANT: frozenset({GERMINATED}),
    GERMINATED: frozenset({TRAINING, CULLED, TERMINATED}),
    TRAINING: frozenset({BLENDING, CULLED, TERMINATED}),
    BLENDING: frozenset({SHADOWING, CULLED, TERMINATED}),
    SHADOWING: frozenset({PROBATIONARY, CULLED, TERMINATED}),
    PROBATIONARY: frozenset({FOSSILIZED, CULLED, TERMINATED}),
    FOSSILIZED: frozenset(),
    CULLED: frozenset({EMBARGOED, TERMINATED}),
    EMBARGOED: frozenset({RESETTING, TERMINATED}),
    RESETTING: frozenset({DORMANT, TERMINATED}),
    TERMINATED: frozenset(),
}

# The gate that guards each automatic transition, by the stage it leaves.
STAGE_GATE: dict[int, int] = {
    GERMINATED: pb.SEED_GATE_G0_SANITY,
    TRAINING: pb.SEED_GATE_G1_TRAINING_READINESS,
    BLENDING: pb.SEED_GATE_G2_GRADIENT_HEALTH,
    SHADOWING: pb.SEED_GATE_G3_CONTRIBUTION,
    PROBATIONARY: pb.SEED_GATE_G4_PROBATION,
    RESETTING: pb.SEED_GATE_G5_RESET,
}


def stage_name(stage: int) -> str:
    """`DORMANT`, `TRAINING`, ... for logs and events."""
    return short_name(pb.SeedLifecycleStage, stage)


def gate_name(gate: int) -> str:
    """`G0_SANITY`, ... for logs and events."""
    return short_name(pb.SeedLifecycleGate, gate)


class IllegalTransition(EsperError):
    """A move the lifecycle does not allow (the stage machine never takes it)."""

    def __init__(self, from_stage: int, to_stage: int) -> None:
        self.from_stage = from_stage
        self.to_stage = to_stage
        super().__init__(f"illegal lifecycle transition {stage_name(from_stage)} -> {stage_name(to_stage)}")


@dataclass(frozen=True)
class Contribution:
    """One counterfactual measurement: accuracy and loss with the seed minus without it (positive helps)."""

    accuracy: float
    loss: float
    stage: int
    step: int


@dataclass(frozen=True)
class GateResult:
    """A gate's verdict: passed, waiting for a signal or dwell, or failed on a measured signal."""

    gate: int
    passed: bool
    failed: bool
    reason: str


@dataclass(frozen=True)
class Advance:
    """What one `advance` call did: at most one transition and the gate verdict behind it."""

    from_stage: int
    to_stage: int
    gate: GateResult | None

    @property
    def moved(self) -> bool:
        """True when the stage changed."""
        return self.from_stage != self.to_stage


@dataclass
class SeedLifecycle:
    """The lifecycle of the seed in one slot, with the measured signals its gates read."""

    settings: KasminaSettings
    stage: int = DORMANT
    stage_steps: int = 0
    age_steps: int = 0
    alpha_steps: int = 0
    alpha_total_steps: int = 0
    sanity_ok: bool | None = None
    sanity_reason: str = ""
    training_gains: list[float] = field(default_factory=list)
    blend_gradient_norms: list[float] = field(default_factory=list)
    contribution: Contribution | None = None
    fossilize_ready: bool = False
    slot_clean: bool | None = None

    # -- measured signals ---------------------------------------------------------------------------------

    @property
    def alpha(self) -> float:
        """The blend weight the slot uses now."""
        if self.stage in (SHADOWING, PROBATIONARY, FOSSILIZED):
            return 1.0
        if self.stage == BLENDING and self.alpha_total_steps > 0:
            return min(1.0, self.alpha_steps / self.alpha_total_steps)
        return 0.0

    def record_sanity(self, ok: bool, reason: str = "") -> None:
        """G0's signal: the seed's output on a real activation had the right shape and was finite."""
        if self.stage == GERMINATED and self.sanity_ok is None:
            self.sanity_ok = ok
            self.sanity_reason = reason

    def record_training_gain(self, gain: float) -> None:
        """G1's signal: the first-order loss reduction the seed would bring, measured on one step."""
        if self.stage == TRAINING:
            self.training_gains.append(gain)
            # G1 reads only the first and the last window; the middle is dropped to bound memory.
            window = self.settings.improvement_window
            if len(self.training_gains) > 2 * window:
                del self.training_gains[window : len(self.training_gains) - window]

    def record_gradient_norm(self, norm: float) -> None:
        """G2's signal: the seed's parameter gradient norm on one blending step."""
        if self.stage == BLENDING:
            self.blend_gradient_norms.append(norm)
            # Keep one ramp's worth: a seed held in BLENDING by a failing gate must not grow without bound.
            excess = len(self.blend_gradient_norms) - max(1, self.alpha_total_steps)
            if excess > 0:
                del self.blend_gradient_norms[:excess]

    def record_contribution(self, accuracy: float, loss: float, step: int) -> None:
        """G3's and G4's signal: a counterfactual measurement by the trainer's evaluation."""
        self.contribution = Contribution(accuracy=accuracy, loss=loss, stage=self.stage, step=step)

    def record_slot_clean(self, clean: bool) -> None:
        """G5's signal: the slot holds no module and no parameter of the retired seed."""
        if self.stage == RESETTING:
            self.slot_clean = clean

    # -- moves ----------------------------------------------------------------------------------------------

    def can_move(self, to_stage: int) -> bool:
        """True when `stage -> to_stage` is a legal move."""
        return to_stage in LEGAL_TRANSITIONS[self.stage]

    def _move(self, to_stage: int) -> None:
        if not self.can_move(to_stage):
            raise IllegalTransition(self.stage, to_stage)
        self.stage = to_stage
        self.stage_steps = 0
        self.fossilize_ready = False
        if to_stage == BLENDING:
            self.alpha_steps = 0
        if to_stage == DORMANT:
            self.age_steps = 0
            self.alpha_steps = 0
            self.alpha_total_steps = 0
            self.sanity_ok = None
            self.sanity_reason = ""
            self.training_gains.clear()
            self.blend_gradient_norms.clear()
            self.contribution = None
            self.slot_clean = None

    def germinate(self, alpha_ramp_steps: int) -> None:
        """DORMANT -> GERMINATED (a command)."""
        if alpha_ramp_steps < 1:
            raise ValueError(f"alpha_ramp_steps must be >= 1, got {alpha_ramp_steps}")
        self._move(GERMINATED)
        self.alpha_total_steps = alpha_ramp_steps
        self.age_steps = 0

    def cull(self) -> None:
        """Any active stage -> CULLED (a command, or a failed sanity check)."""
        if self.stage not in ACTIVE_STAGES:
            raise IllegalTransition(self.stage, CULLED)
        self._move(CULLED)

    def fossilize(self) -> None:
        """PROBATIONARY -> FOSSILIZED (a command), only once G4 has passed."""
        if self.stage != PROBATIONARY or not self.fossilize_ready:
            raise IllegalTransition(self.stage, FOSSILIZED)
        self._move(FOSSILIZED)

    def terminate(self) -> bool:
        """End of run: a seed still on its way (or cooling down) is TERMINATED; returns True if it moved."""
        if TERMINATED in LEGAL_TRANSITIONS[self.stage]:
            self._move(TERMINATED)
            return True
        return False

    # -- the step -------------------------------------------------------------------------------------------

    def advance(self) -> Advance:
        """Count one training step and take at most one gated transition."""
        start = self.stage
        if start in (DORMANT, FOSSILIZED, TERMINATED):
            if start == FOSSILIZED:
                self.age_steps += 1
            return Advance(start, start, None)
        self.stage_steps += 1
        self.age_steps += 1
        if start == BLENDING:
            self.alpha_steps = min(self.alpha_total_steps, self.alpha_steps + 1)
        if start == CULLED:
            self._move(EMBARGOED)
            return Advance(start, EMBARGOED, None)
        if start == EMBARGOED:
            if self.stage_steps >= self.settings.embargo_steps:
                self._move(RESETTING)
                return Advance(start, RESETTING, None)
            return Advance(start, start, None)
        gate = self._evaluate_gate()
        if gate.passed and start != PROBATIONARY:
            self._move(_NEXT_STAGE[start])
        if start == PROBATIONARY:
            self.fossilize_ready = gate.passed
        return Advance(start, self.stage, gate)

    def _evaluate_gate(self) -> GateResult:
        stage = self.stage
        gate = STAGE_GATE[stage]
        if stage == GERMINATED:
            return self._g0(gate)
        if stage == TRAINING:
            return self._g1(gate)
        if stage == BLENDING:
            return self._g2(gate)
        if stage in (SHADOWING, PROBATIONARY):
            return self._contribution_gate(gate)
        return self._g5(gate)

    def _g0(self, gate: int) -> GateResult:
        if self.sanity_ok is None:
            return _wait(gate, "no output measured yet")
        if not self.sanity_ok:
            return _fail(gate, self.sanity_reason or "sanity check failed")
        return _pass(gate, "shapes match and output is finite")

    def _g1(self, gate: int) -> GateResult:
        window = self.settings.improvement_window
        if self.stage_steps < self.settings.min_training_steps:
            return _wait(gate, f"{self.stage_steps}/{self.settings.min_training_steps} training steps")
        if len(self.training_gains) < 2 * window:
            return _wait(gate, f"{len(self.training_gains)} gain measurements, need {2 * window}")
        if not all(math.isfinite(g) for g in self.training_gains[-window:]):
            return _fail(gate, "non-finite training signal")
        first = sum(self.training_gains[:window]) / window
        last = sum(self.training_gains[-window:]) / window
        if last <= 0 or last <= first:
            return _fail(gate, f"no improvement: gain {first:.3g} -> {last:.3g}")
        return _pass(gate, f"gain {first:.3g} -> {last:.3g}")

    def _g2(self, gate: int) -> GateResult:
        if self.alpha_steps < self.alpha_total_steps:
            return _wait(gate, f"alpha ramp {self.alpha_steps}/{self.alpha_total_steps}")
        norms = self.blend_gradient_norms
        if not norms:
            return _wait(gate, "no gradient measured while blending")
        if not all(math.isfinite(n) for n in norms):
            return _fail(gate, "non-finite seed gradient while blending")
        if max(norms) > self.settings.max_gradient_norm:
            return _fail(gate, f"seed gradient norm {max(norms):.3g} above {self.settings.max_gradient_norm}")
        if norms[-1] <= 0.0:
            return _fail(gate, "seed gradient vanished")
        return _pass(gate, f"{len(norms)} healthy gradients, max {max(norms):.3g}")

    def _contribution_gate(self, gate: int) -> GateResult:
        dwell = (
            self.settings.min_shadowing_steps if self.stage == SHADOWING else self.settings.probation_steps
        )
        if self.stage_steps < dwell:
            return _wait(gate, f"{self.stage_steps}/{dwell} steps held")
        measured = self.contribution
        if measured is None or measured.stage != self.stage:
            return _wait(gate, f"no contribution measured in {stage_name(self.stage)}")
        if measured.loss <= self.settings.min_contribution_loss:
            return _fail(gate, f"loss contribution {measured.loss:.4g} not positive")
        if measured.accuracy < -self.settings.contribution_accuracy_tolerance:
            return _fail(gate, f"accuracy contribution {measured.accuracy:.4g} negative")
        return _pass(gate, f"contribution loss {measured.loss:.4g}, accuracy {measured.accuracy:.4g}")

    def _g5(self, gate: int) -> GateResult:
        if self.slot_clean is None:
            return _wait(gate, "slot not inspected yet")
        if not self.slot_clean:
            return _fail(gate, "slot still holds seed state")
        return _pass(gate, "slot clean")

    # -- persistence ----------------------------------------------------------------------------------------

    def export_state(self) -> dict[str, Any]:
        """JSON-ready state (settings excluded: they are configuration)."""
        contribution = None
        if self.contribution is not None:
            c = self.contribution
            contribution = {"accuracy": c.accuracy, "loss": c.loss, "stage": c.stage, "step": c.step}
        return {
            "stage": self.stage,
            "stage_steps": self.stage_steps,
            "age_steps": self.age_steps,
            "alpha_steps": self.alpha_steps,
            "alpha_total_steps": self.alpha_total_steps,
            "sanity_ok": self.sanity_ok,
            "sanity_reason": self.sanity_reason,
            "training_gains": list(self.training_gains),
            "blend_gradient_norms": list(self.blend_gradient_norms),
            "contribution": contribution,
            "fossilize_ready": self.fossilize_ready,
            "slot_clean": self.slot_clean,
        }

    @classmethod
    def from_state(cls, settings: KasminaSettings, state: dict[str, Any]) -> SeedLifecycle:
        """Inverse of `export_state`."""
        raw = state.get("contribution")
        contribution = None
        if raw is not None:
            contribution = Contribution(
                accuracy=float(raw["accuracy"]),
                loss=float(raw["loss"]),
                stage=int(raw["stage"]),
                step=int(raw["step"]),
            )
        return cls(
            settings=settings,
            stage=int(state["stage"]),
            stage_steps=int(state["stage_steps"]),
            age_steps=int(state["age_steps"]),
            alpha_steps=int(state["alpha_steps"]),
            alpha_total_steps=int(state["alpha_total_steps"]),
            sanity_ok=state["sanity_ok"],
            sanity_reason=str(state["sanity_reason"]),
            training_gains=[float(g) for g in state["training_gains"]],
            blend_gradient_norms=[float(n) for n in state["blend_gradient_norms"]],
            contribution=contribution,
            fossilize_ready=bool(state["fossilize_ready"]),
            slot_clean=state["slot_clean"],
        )


_NEXT_STAGE: dict[int, int] = {
    GERMINATED: TRAINING,
    TRAINING: BLENDING,
    BLENDING: SHADOWING,
    SHADOWING: PROBATIONARY,
    RESETTING: DORMANT,
}


def _pass(gate: int, reason: str) -> GateResult:
    return GateResult(gate=gate, passed=True, failed=False, reason=reason)


def _wait(gate: int, reason: str) -> GateResult:
    return GateResult(gate=gate, passed=False, failed=False, reason=reason)


def _fail(gate: int, reason: str) -> GateResult:
    return GateResult(gate=gate, passed=False, failed=True, reason=reason)
