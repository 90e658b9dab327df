"""Golden tests, one per risk gate: the input, the final action and the reason."""

from __future__ import annotations

import math

import pytest

from esper.leyline import pb
from esper.tamiyo.model.proposal import Proposal
from esper.tamiyo.runtime.risk import PASSED, RiskContext, RiskGates
from tests.tamiyo.packets import make_packet, settings

GERMINATE = Proposal(action=pb.POLICY_ACTION_GERMINATE, slot_id="slot-0", blueprint_id="bp-0")
SAFE = pb.BlueprintDescriptor(blueprint_id="bp-0", tier=pb.BLUEPRINT_TIER_SAFE, risk=0.1)


def gates(descriptor: pb.BlueprintDescriptor | None = SAFE, **overrides: object) -> RiskGates:
    return RiskGates(settings(**overrides), lambda _bid: descriptor)


def test_pass_keeps_the_proposal() -> None:
    decision = gates().evaluate(GERMINATE, make_packet(), RiskContext(last_latency_ms=1.0))
    assert decision.gate == PASSED and decision.proposal == GERMINATE
    assert decision.annotations() == {"risk_gate": "pass", "policy_action": "POLICY_ACTION_GERMINATE"}


def test_loss_spike_pauses_growth() -> None:
    chain = gates(risk_loss_warmup_steps=2)
    calm = make_packet()
    for _ in range(3):
        chain.evaluate(Proposal(action=pb.POLICY_ACTION_WAIT), calm, RiskContext())
    spike = make_packet()
    spike.validation_loss = 5.0
    decision = chain.evaluate(GERMINATE, spike, RiskContext())
    assert decision.gate == "loss_spike"
    assert decision.proposal.action == pb.POLICY_ACTION_PAUSE
    assert decision.reason == "validation loss 5 > 1.5 (1.5x baseline)"
    assert decision.annotations()["risk_reason"] == decision.reason
    assert (
        chain.evaluate(Proposal(action=pb.POLICY_ACTION_CULL, slot_id="slot-0"), spike, RiskContext()).gate
        == PASSED
    )


def test_non_finite_loss_is_a_spike() -> None:
    packet = make_packet()
    packet.validation_loss = math.nan
    decision = gates().evaluate(GERMINATE, packet, RiskContext())
    assert (decision.gate, decision.proposal.action) == ("loss_spike", pb.POLICY_ACTION_PAUSE)


def test_latency_over_budget_holds_germination() -> None:
    decision = gates().evaluate(GERMINATE, make_packet(), RiskContext(last_latency_ms=9_500.0))
    assert decision.gate == "latency" and decision.proposal.action == pb.POLICY_ACTION_WAIT
    assert decision.reason == "last decision took 9500.00 ms > 9000.00 ms"


def test_isolation_violation_blocks_fossilising_that_seed() -> None:
    packet = make_packet(stages={1: pb.SEED_STAGE_PROBATIONARY})
    packet.seed_states[1].metrics["isolation_violations"] = 3.0
    fossilize = Proposal(action=pb.POLICY_ACTION_FOSSILIZE, slot_id="slot-1")
    decision = gates().evaluate(fossilize, packet, RiskContext())
    assert decision.gate == "isolation" and decision.proposal.action == pb.POLICY_ACTION_WAIT
    assert decision.reason == "seed in slot 'slot-1' has 3 isolation violations"
    assert decision.proposal.slot_id == ""


@pytest.mark.parametrize(
    ("descriptor", "reason"),
    [
        (None, "blueprint 'bp-0' has no catalogue entry"),
        (pb.BlueprintDescriptor(blueprint_id="bp-0", quarantine=True), "blueprint 'bp-0' is quarantined"),
        (
            pb.BlueprintDescriptor(blueprint_id="bp-0", tier=pb.BLUEPRINT_TIER_HIGH_RISK),
            "blueprint 'bp-0' is in the HIGH_RISK tier",
        ),
        (pb.BlueprintDescriptor(blueprint_id="bp-0", risk=0.95), "blueprint 'bp-0' risk 0.95 > 0.8"),
    ],
)
def test_blueprint_gate(descriptor: pb.BlueprintDescriptor | None, reason: str) -> None:
    decision = gates(descriptor).evaluate(GERMINATE, make_packet(), RiskContext())
    assert decision.gate == "blueprint" and decision.proposal.action == pb.POLICY_ACTION_WAIT
    assert decision.reason == reason


def test_blueprint_gate_without_catalogue_holds_only_when_required() -> None:
    loose = RiskGates(settings(), None).evaluate(GERMINATE, make_packet(), RiskContext())
    strict = RiskGates(settings(risk_require_blueprint_metadata=True), None).evaluate(
        GERMINATE, make_packet(), RiskContext()
    )
    assert loose.gate == PASSED
    assert strict.gate == "blueprint" and strict.proposal.action == pb.POLICY_ACTION_WAIT


def test_resource_pressure_holds_germination() -> None:
    packet = make_packet()
    packet.hardware_context.available_memory_gb = 0.1
    decision = gates().evaluate(GERMINATE, packet, RiskContext())
    assert decision.gate == "resource" and decision.proposal.action == pb.POLICY_ACTION_WAIT
    assert decision.reason == "free memory 0.6% < 5.0%"


# --- the growth budget -----------------------------------------------------------------------------


def _budgeted(max_parameters: int, param_count: float | None = 1000.0) -> pb.SystemStatePacket:
    packet = make_packet()
    packet.max_parameters = max_parameters
    if param_count is not None:
        packet.training_metrics["param_count"] = param_count
    return packet


def _costs(blueprint_id: str, width: int, kind: str) -> int | None:
    return {"bp-0": 200, "bp-big": 5000}.get(blueprint_id)


def budget_gates(**overrides: object) -> RiskGates:
    return RiskGates(settings(**overrides), lambda _bid: SAFE, parameter_cost=_costs)


def test_budget_holds_a_germination_that_would_cross_it_and_says_why() -> None:
    decision = budget_gates().evaluate(GERMINATE, _budgeted(1100), RiskContext())
    assert decision.gate == "budget" and decision.proposal.action == pb.POLICY_ACTION_WAIT
    assert (
        decision.reason
        == "germinating bp-0 in slot slot-0 adds 200 parameters: 1000 + 200 > max_parameters 1100"
    )
    assert decision.annotations()["risk_gate"] == "budget"


def test_budget_passes_what_fits_and_everything_when_unbounded() -> None:
    assert budget_gates().evaluate(GERMINATE, _budgeted(1200), RiskContext()).gate == PASSED
    big = Proposal(action=pb.POLICY_ACTION_GERMINATE, slot_id="slot-0", blueprint_id="bp-big")
    assert budget_gates().evaluate(big, _budgeted(0), RiskContext()).gate == PASSED


def test_budget_counts_the_channel_blenders_gates() -> None:
    channel = Proposal(
        action=pb.POLICY_ACTION_GERMINATE,
        slot_id="slot-0",
        blueprint_id="bp-0",
        blend_mode=pb.BLEND_MODE_CHANNEL,
    )
    # 200 for the module and 32 per-channel gates for the slot of width 32.
    assert budget_gates().evaluate(channel, _budgeted(1232), RiskContext()).gate == PASSED
    assert budget_gates().evaluate(channel, _budgeted(1231), RiskContext()).gate == "budget"


@pytest.mark.parametrize(
    ("packet", "proposal", "reason"),
    [
        (_budgeted(5000, param_count=None), GERMINATE, "does not say the model's size"),
        (
            _budgeted(5000),
            Proposal(action=pb.POLICY_ACTION_GERMINATE, slot_id="slot-9", blueprint_id="bp-0"),
            "not in the topology",
        ),
        (
            _budgeted(5000),
            Proposal(action=pb.POLICY_ACTION_GERMINATE, slot_id="slot-0", blueprint_id="bp-unknown"),
            "cost of blueprint 'bp-unknown' in slot 'slot-0' is unknown",
        ),
    ],
)
def test_budget_refuses_what_it_cannot_count(
    packet: pb.SystemStatePacket, proposal: Proposal, reason: str
) -> None:
    decision = budget_gates().evaluate(proposal, packet, RiskContext())
    assert decision.gate == "budget" and reason in decision.reason


def test_budget_counts_built_in_blueprints_by_default() -> None:
    from esper.urza import param_count

    packet = _budgeted(1000 + param_count("lowrank", 32, "mlp") - 1)
    packet.topology.slots[0].kind = "mlp"
    lowrank = Proposal(action=pb.POLICY_ACTION_GERMINATE, slot_id="slot-0", blueprint_id="lowrank")
    chain = RiskGates(settings(), lambda _bid: SAFE)
    assert chain.evaluate(lowrank, packet, RiskContext()).gate == "budget"
    packet.max_parameters += 1
    assert chain.evaluate(lowrank, packet, RiskContext()).gate == PASSED
