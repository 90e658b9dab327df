"""Risk gates: the policy proposes, the gates decide what is issued, and say why.

Gates run in a fixed order; the first that objects replaces the proposal with WAIT or PAUSE and names
itself and its reason. An override is a decision like any other (recorded in the command's annotations),
never a hidden failure. Thresholds come from `TamiyoSettings`, resolved once.

- loss_spike: validation loss above ratio x its running baseline, or non-finite -> PAUSE
  (WAIT, CULL and PAUSE pass: removing a seed is a safe reaction to a spike).
- latency: the previous decision's latency above a fraction of the step budget -> GERMINATE held (WAIT).
  The budget is the service's resolved one (`step_budget_ms`), the same the worker and health use.
- isolation: `isolation_violations` of a seed above the maximum -> FOSSILIZE of that seed and any
  GERMINATE held (WAIT).
- blueprint: the catalogue descriptor is unknown, quarantined, HIGH_RISK tier or too risky, or the
  catalogue could not answer within the decision's remaining budget -> GERMINATE held (WAIT). A lookup
  that supports it (`BudgetedLookup`: the metadata cache) answers from its entries or fetches within
  `RiskContext.remaining_ms`; a failure is its own reason (with the lookup's `blueprint_metadata_unavailable`
  event), never "no catalogue entry".
- budget: the germination's seed, or the parameters a WIDEN or DEEPEN adds, would take the model past
  the packet's growth budget (`max_parameters`), or the cost cannot be counted -> held (WAIT). See
  `esper.tamiyo.model.budget`.
- resource: hardware context with too little free memory, too busy or too hot -> GERMINATE held (WAIT).

A growth proposal (WIDEN, DEEPEN) adds parameters as a GERMINATE does: the latency, isolation and resource
gates hold it where they hold a germination.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

from esper.leyline import pb
from esper.tamiyo.model.budget import ParameterCost, builtin_parameter_cost, growth_over_budget, over_budget
from esper.tamiyo.model.proposal import GROWTH_ACTIONS, Proposal
from esper.tamiyo.runtime.metadata import BlueprintMetadataUnavailable
from esper.tamiyo.settings import TamiyoSettings

BlueprintLookup = Callable[[str], "pb.BlueprintDescriptor | None"]


@runtime_checkable
class BudgetedLookup(Protocol):
    """A lookup that can answer within a budget (the metadata cache is one)."""

    def describe_within(self, blueprint_id: str, timeout_ms: float | None) -> pb.BlueprintDescriptor | None:
        """The descriptor, None if unknown; `BlueprintMetadataUnavailable` (after its event) if the
        catalogue could not answer within `timeout_ms`."""
        ...


# Proposals that add parameters to the model: held by the latency, isolation and resource gates.
_ADDING = frozenset({pb.POLICY_ACTION_GERMINATE, *GROWTH_ACTIONS})

GATES: tuple[str, ...] = ("loss_spike", "latency", "isolation", "blueprint", "budget", "resource")
PASSED = "pass"


@dataclass(frozen=True)
class RiskContext:
    """What the gates need besides the proposal and the packet."""

    last_latency_ms: float | None = None
    remaining_ms: float | None = None  # of the decision's budget, for a catalogue lookup


@dataclass(frozen=True)
class RiskDecision:
    """The proposal to issue, the gate that decided (`pass` when none objected) and why."""

    proposal: Proposal
    gate: str
    reason: str
    original_action: int

    @property
    def overridden(self) -> bool:
        """True when a gate replaced the policy's proposal."""
        return self.gate != PASSED

    def annotations(self) -> dict[str, str]:
        """What the command carries about this decision."""
        notes = {"risk_gate": self.gate, "policy_action": pb.PolicyAction.Name(self.original_action)}
        if self.reason:
            notes["risk_reason"] = self.reason
        return notes


class RiskGates:
    """Stateful (the loss baseline) gate chain; one instance per service."""

    def __init__(
        self,
        settings: TamiyoSettings,
        blueprint_metadata: BlueprintLookup | None = None,
        *,
        step_budget_ms: float | None = None,
        parameter_cost: ParameterCost = builtin_parameter_cost,
    ) -> None:
        self._latency_fraction = settings.risk_latency_fraction
        self.step_budget_ms = settings.step_timeout_ms if step_budget_ms is None else step_budget_ms
        self._spike_ratio = settings.risk_loss_spike_ratio
        self._warmup = settings.risk_loss_warmup_steps
        self._decay = settings.risk_loss_ema_decay
        self._max_violations = settings.risk_max_isolation_violations
        self._max_risk = settings.risk_max_blueprint_risk
        self._allow_high_risk = settings.risk_allow_high_risk_tier
        self._require_metadata = settings.risk_require_blueprint_metadata
        self._min_free = settings.risk_min_free_memory_frac
        self._max_util = settings.risk_max_utilization_percent
        self._max_temp = settings.risk_max_temperature_celsius
        self._metadata = blueprint_metadata
        self._parameter_cost = parameter_cost
        self._loss_baseline: float | None = None
        self._loss_seen = 0

    def evaluate(
        self, proposal: Proposal, packet: pb.SystemStatePacket, context: RiskContext
    ) -> RiskDecision:
        """The decision for `proposal`: unchanged (gate `pass`) or overridden by the first objecting gate."""
        checks = (
            ("loss_spike", self._loss_spike),
            ("latency", self._latency),
            ("isolation", self._isolation),
            ("blueprint", self._blueprint),
            ("budget", self._budget),
            ("resource", self._resource),
        )
        decision = RiskDecision(proposal, PASSED, "", proposal.action)
        for gate, check in checks:
            verdict = check(proposal, packet, context)
            if verdict is not None:
                action, reason = verdict
                final = replace(
                    proposal,
                    action=action,
                    slot_id="",
                    blueprint_id="",
                    layer_id="",
                    reason=f"risk:{gate}: {reason}",
                )
                decision = RiskDecision(final, gate, reason, proposal.action)
                break
        self._observe_loss(packet.validation_loss)
        return decision

    def _observe_loss(self, loss: float) -> None:
        if not math.isfinite(loss):
            return
        self._loss_seen += 1
        if self._loss_baseline is None:
            self._loss_baseline = loss
        else:
            self._loss_baseline = self._decay * self._loss_baseline + (1 - self._decay) * loss

    def _loss_spike(
        self, proposal: Proposal, packet: pb.SystemStatePacket, _: RiskContext
    ) -> tuple[int, str] | None:
        if proposal.action in (pb.POLICY_ACTION_WAIT, pb.POLICY_ACTION_CULL, pb.POLICY_ACTION_PAUSE):
            return None
        loss = packet.validation_loss
        if not math.isfinite(loss):
            return pb.POLICY_ACTION_PAUSE, f"validation loss is {loss}"
        if self._loss_baseline is None or self._loss_seen < self._warmup:
            return None
        limit = self._spike_ratio * self._loss_baseline
        if loss > limit:
            return (
                pb.POLICY_ACTION_PAUSE,
                f"validation loss {loss:.4g} > {limit:.4g} ({self._spike_ratio}x baseline)",
            )
        return None

    def _latency(
        self, proposal: Proposal, _: pb.SystemStatePacket, context: RiskContext
    ) -> tuple[int, str] | None:
        if proposal.action not in _ADDING or context.last_latency_ms is None:
            return None
        limit_ms = self.step_budget_ms * self._latency_fraction
        if context.last_latency_ms > limit_ms:
            return pb.POLICY_ACTION_WAIT, (
                f"last decision took {context.last_latency_ms:.2f} ms > {limit_ms:.2f} ms"
            )
        return None

    def _isolation(
        self, proposal: Proposal, packet: pb.SystemStatePacket, _: RiskContext
    ) -> tuple[int, str] | None:
        violators = {
            state.slot_id: state.metrics["isolation_violations"]
            for state in packet.seed_states
            if state.metrics.get("isolation_violations", 0.0) > self._max_violations
        }
        if not violators:
            return None
        if proposal.action == pb.POLICY_ACTION_FOSSILIZE and proposal.slot_id in violators:
            return pb.POLICY_ACTION_WAIT, (
                f"seed in slot {proposal.slot_id!r} has {violators[proposal.slot_id]:g} isolation violations"
            )
        if proposal.action in _ADDING:
            return pb.POLICY_ACTION_WAIT, f"isolation violations in slots {sorted(violators)}"
        return None

    def _blueprint(  # noqa: PLR0911 (each refusal of the blueprint gate returns its own reason)
        self, proposal: Proposal, _: pb.SystemStatePacket, context: RiskContext
    ) -> tuple[int, str] | None:
        if proposal.action != pb.POLICY_ACTION_GERMINATE:
            return None
        blueprint = proposal.blueprint_id
        if self._metadata is None:
            if self._require_metadata:
                return pb.POLICY_ACTION_WAIT, "no blueprint catalogue is available to vet the blueprint"
            return None
        lookup = self._metadata
        if isinstance(lookup, BudgetedLookup):
            try:
                descriptor = lookup.describe_within(blueprint, context.remaining_ms)
            except BlueprintMetadataUnavailable as exc:  # the lookup emitted its event
                return (
                    pb.POLICY_ACTION_WAIT,
                    f"catalogue unavailable for blueprint {blueprint!r}: {exc.reason}",
                )
        else:
            descriptor = lookup(blueprint)
        if descriptor is None:
            return pb.POLICY_ACTION_WAIT, f"blueprint {blueprint!r} has no catalogue entry"
        if descriptor.quarantine:
            return pb.POLICY_ACTION_WAIT, f"blueprint {blueprint!r} is quarantined"
        if descriptor.tier == pb.BLUEPRINT_TIER_HIGH_RISK and not self._allow_high_risk:
            return pb.POLICY_ACTION_WAIT, f"blueprint {blueprint!r} is in the HIGH_RISK tier"
        if descriptor.risk > self._max_risk:
            return (
                pb.POLICY_ACTION_WAIT,
                f"blueprint {blueprint!r} risk {descriptor.risk:.3g} > {self._max_risk:.3g}",
            )
        return None

    def _budget(
        self, proposal: Proposal, packet: pb.SystemStatePacket, _: RiskContext
    ) -> tuple[int, str] | None:
        if proposal.action in GROWTH_ACTIONS:
            reason = growth_over_budget(
                packet, proposal.action, proposal.layer_id, units=proposal.units, hidden=proposal.hidden
            )
            return None if reason is None else (pb.POLICY_ACTION_WAIT, reason)
        if proposal.action != pb.POLICY_ACTION_GERMINATE:
            return None
        reason = over_budget(
            packet, proposal.slot_id, proposal.blueprint_id, proposal.blend_mode, self._parameter_cost
        )
        return None if reason is None else (pb.POLICY_ACTION_WAIT, reason)

    def _resource(
        self, proposal: Proposal, packet: pb.SystemStatePacket, _: RiskContext
    ) -> tuple[int, str] | None:
        if proposal.action not in _ADDING or not packet.HasField("hardware_context"):
            return None
        hardware = packet.hardware_context
        if hardware.total_memory_gb > 0:
            free = hardware.available_memory_gb / hardware.total_memory_gb
            if free < self._min_free:
                return pb.POLICY_ACTION_WAIT, f"free memory {free:.1%} < {self._min_free:.1%}"
        if hardware.utilization_percent > self._max_util:
            return (
                pb.POLICY_ACTION_WAIT,
                f"utilisation {hardware.utilization_percent:.1f}% > {self._max_util:.1f}%",
            )
        if hardware.temperature_celsius > self._max_temp:
            return (
                pb.POLICY_ACTION_WAIT,
                f"temperature {hardware.temperature_celsius:.1f}C > {self._max_temp:.1f}C",
            )
        return None
