"""What `SeedManager` measures and reports.

In: seed gradient norms, training gains and isolation from the backward pass, counterfactual contributions.
Out: seed and growth states for the packet, and each gate's outcome once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

from esper.kasmina.events import EventKind
from esper.kasmina.growing import gradient_norm
from esper.kasmina.lifecycle import (
    BLEND_STAGES,
    BLENDING,
    DORMANT,
    EMBARGOED,
    PROBATIONARY,
    SHADOWING,
    Advance,
    SeedLifecycle,
    gate_name,
    stage_name,
)
from esper.kasmina.manager_core import _ManagerCore
from esper.leyline import pb


class _Reporting(_ManagerCore):
    """Measurements of seeds and growths, and the `SeedState` of each as the controller reads it."""

    # -- measurement ----------------------------------------------------------------------------------------

    def measurable_slots(self) -> list[str]:
        """Slots whose seed reaches the host output with a ramped alpha: the counterfactual candidates."""
        measured = (BLENDING, SHADOWING, PROBATIONARY)
        return [
            slot_id
            for slot_id, r in self._records.items()
            if r.lifecycle.stage in measured and r.lifecycle.alpha > 0
        ] + [
            growth_id
            for growth_id, g in self._growths.items()
            if g.lifecycle.stage in measured and g.lifecycle.alpha > 0 and g.module is not None
        ]

    @contextmanager
    def counterfactual(self, slot_id: str) -> Iterator[None]:
        """Within the block, the seed of `slot_id` (or the growth of that id) acts with alpha forced to 0."""
        growth = self._growths.get(slot_id)
        if growth is not None:
            growth.sync(alpha_override=0.0)
            try:
                yield
            finally:
                growth.sync()
            return
        slot = self._record(slot_id).slot
        previous = slot.alpha_override
        slot.alpha_override = 0.0
        try:
            yield
        finally:
            slot.alpha_override = previous

    def record_contribution(self, slot_id: str, *, accuracy: float, loss: float, step: int) -> None:
        """A counterfactual measurement: accuracy gained and loss avoided thanks to the seed."""
        if not (math.isfinite(accuracy) and math.isfinite(loss)):
            raise ValueError(f"contribution of {slot_id} must be finite, got {accuracy}, {loss}")
        growth = self._growths.get(slot_id)
        lifecycle = growth.lifecycle if growth is not None else self._record(slot_id).lifecycle
        lifecycle.record_contribution(accuracy, loss, step)

    def arm_gradient_probes(self) -> None:
        """Measure the host gradient at every empty slot on the next training step."""
        for record in self._records.values():
            if record.slot.seed is None:
                record.slot.arm_gradient_probe()

    def observe_backward(self, step: int) -> None:
        """Read what the backward pass measured: seed gradient norms, training gains, isolation."""
        for record in self._records.values():
            slot, lifecycle = record.slot, record.lifecycle
            if slot.seed is None:
                continue
            grads = [p.grad for p in slot.seed.parameters() if p.grad is not None]
            if grads:
                record.seed_gradient_norm = gradient_norm(grads)
                lifecycle.record_gradient_norm(record.seed_gradient_norm)
            for gain in slot.training_gains:
                lifecycle.record_training_gain(gain)
            slot.training_gains.clear()
            if slot.isolation_violations > record.isolation_reported:
                new = slot.isolation_violations - record.isolation_reported
                record.isolation_reported = slot.isolation_violations
                record.isolation_violations += new
                self._emit(
                    EventKind.ISOLATION_VIOLATION,
                    step,
                    record,
                    reason=f"{new} foreign leaf tensor(s) reachable from the seed's output",
                    detail={"violations_total": record.isolation_violations},
                )
        for growth in self._growths.values():
            module = growth.module
            if module is None:
                continue
            norm = growth.gradient_norm()
            if norm is not None:
                growth.seed_gradient_norm = norm
                growth.lifecycle.record_gradient_norm(norm)
            for gain in module.training_gains:
                growth.lifecycle.record_training_gain(gain)
            module.training_gains.clear()

    # -- seed states ----------------------------------------------------------------------------------------

    def seed_states(self, *, learning_rate: float, steps_per_epoch: int) -> list[pb.SeedState]:
        """One `SeedState` per slot, dormant ones included, in host order."""
        states = []
        for slot_id, record in self._records.items():
            lifecycle, slot = record.lifecycle, record.slot
            dormant = lifecycle.stage == DORMANT
            gradient = slot.host_gradient_norm if dormant else record.seed_gradient_norm
            contribution = lifecycle.contribution
            state = pb.SeedState(
                seed_id=record.seed_id,
                slot_id=slot_id,
                stage=lifecycle.stage,
                gradient_norm=gradient if gradient is not None and math.isfinite(gradient) else 0.0,
                learning_rate=learning_rate,
                layer_depth=slot.depth,
                age_steps=lifecycle.age_steps,
                age_epochs=lifecycle.age_steps // max(1, steps_per_epoch),
                risk_score=record.risk,
                blueprint_id=record.blueprint_id,
                blend_mode=record.blend_mode,
            )
            state.metrics.update(
                {
                    "alpha": lifecycle.alpha,
                    "alpha_steps": float(lifecycle.alpha_steps),
                    "alpha_total_steps": float(lifecycle.alpha_total_steps),
                    "blend_allowed": 1.0 if lifecycle.stage in BLEND_STAGES else 0.0,
                    "stage_steps": float(lifecycle.stage_steps),
                    "contribution_accuracy": contribution.accuracy if contribution else 0.0,
                    "contribution_loss": contribution.loss if contribution else 0.0,
                    "contribution_measured": 1.0 if contribution else 0.0,
                    "isolation_violations": float(record.isolation_violations),
                    "param_count": float(record.param_count),
                    "gradient_measured": 1.0 if gradient is not None and math.isfinite(gradient) else 0.0,
                    "fossilize_ready": 1.0 if lifecycle.fossilize_ready else 0.0,
                    "embargo_remaining": float(
                        max(0, self.settings.embargo_steps - lifecycle.stage_steps)
                        if lifecycle.stage == EMBARGOED
                        else 0
                    ),
                }
            )
            states.append(state)
        return states

    def growth_states(self, *, learning_rate: float, steps_per_epoch: int) -> list[pb.SeedState]:
        """One `SeedState` per growth: slot_id and seed_id are its id, blueprint_id "widen" or "deepen"."""
        states = []
        for growth_id, growth in self._growths.items():
            lifecycle = growth.lifecycle
            gradient = growth.seed_gradient_norm
            contribution = lifecycle.contribution
            state = pb.SeedState(
                seed_id=growth_id,
                slot_id=growth_id,
                stage=lifecycle.stage,
                gradient_norm=gradient if gradient is not None and math.isfinite(gradient) else 0.0,
                learning_rate=learning_rate,
                age_steps=lifecycle.age_steps,
                age_epochs=lifecycle.age_steps // max(1, steps_per_epoch),
                blueprint_id=growth.name,
            )
            state.metrics.update(
                {
                    "alpha": lifecycle.alpha,
                    "stage_steps": float(lifecycle.stage_steps),
                    "contribution_accuracy": contribution.accuracy if contribution else 0.0,
                    "contribution_loss": contribution.loss if contribution else 0.0,
                    "contribution_measured": 1.0 if contribution else 0.0,
                    "param_count": float(growth.param_count),
                    "units": float(growth.units),
                    "fossilize_ready": 1.0 if lifecycle.fossilize_ready else 0.0,
                }
            )
            states.append(state)
        return states


def _failure_key(lifecycle: SeedLifecycle, gate: int) -> str:
    measured = lifecycle.contribution
    measurement = measured.step if measured is not None and measured.stage == lifecycle.stage else -1
    return f"{gate}:{measurement}"


class _GateMemory(Protocol):
    """What a seed record and a growth remember of their gates, so each outcome is reported once."""

    last_gate_failure: str
    ready_reported: bool


def _advance_reported(lifecycle: SeedLifecycle, memory: _GateMemory, emit: Callable[..., None]) -> Advance:
    """Step `lifecycle` once and report what happened through `emit(kind, **fields)`: a failed gate
    once per gate and stage visit (and again for each new contribution measurement), every
    transition, and readiness to fossilise once it is reached."""
    outcome = lifecycle.advance()
    gate = outcome.gate
    if gate is not None and gate.failed and _failure_key(lifecycle, gate.gate) != memory.last_gate_failure:
        memory.last_gate_failure = _failure_key(lifecycle, gate.gate)
        emit(EventKind.GATE_FAILED, gate=gate_name(gate.gate), reason=gate.reason)
    if outcome.moved:
        memory.last_gate_failure = ""
        emit(
            EventKind.TRANSITION,
            from_stage=stage_name(outcome.from_stage),
            to_stage=stage_name(outcome.to_stage),
            gate=gate_name(gate.gate) if gate is not None else "",
            reason=gate.reason if gate is not None else "",
        )
    elif outcome.from_stage == PROBATIONARY and gate is not None:
        if lifecycle.fossilize_ready and not memory.ready_reported:
            emit(EventKind.GATE_PASSED, gate=gate_name(gate.gate), reason=gate.reason)
        memory.ready_reported = lifecycle.fossilize_ready
    return outcome
