"""Simic learns the GNN's growth heads: heuristic WIDEN/DEEPEN records resolve to layer and amount
choices, and behaviour cloning from the heuristic with growth on teaches the GNN to widen."""

from __future__ import annotations

import pytest
import torch

from esper.leyline import pb
from esper.simic.imitation import imitate
from esper.simic.settings import SimicSettings
from esper.simic.transitions import ChoiceUnresolvable, RecordCollector, build_samples, resolve_choices
from esper.simic.validation import choice_log_probs
from esper.tamiyo.model.builder import GraphBuilder
from esper.tamiyo.model.heuristic import HeuristicPolicy, HeuristicSettings
from esper.tamiyo.model.proposal import ACTIONS, WIDEN_UNITS
from tests.simic.support import record_for
from tests.tamiyo.packets import settings, small_policy
from tests.tamiyo.test_heuristic_growth import host_packet

WIDEN, DEEPEN = pb.POLICY_ACTION_WIDEN, pb.POLICY_ACTION_DEEPEN


def decision(action: int, layer_id: str, units: int = 0) -> pb.DecisionRecord:
    record = pb.DecisionRecord(command_id="cmd-1", action=action)
    record.growth.layer_id = layer_id
    record.growth.units = units
    return record


def test_a_heuristic_growth_record_resolves_to_its_layer_and_the_nearest_allowed_amount() -> None:
    graph = GraphBuilder(settings()).build(host_packet(1.0), update_stats=False)
    fc2 = graph.layer_ids.index("fc2")
    assert resolve_choices(decision(WIDEN, "fc2", 4), graph) == {
        "action": ACTIONS.index(WIDEN),
        "layer": fc2,
        "amount": WIDEN_UNITS.index(4),
    }
    # 12 units is no option: the nearest allowed one (settings allow 2, 4, 8) stands for it.
    assert resolve_choices(decision(WIDEN, "fc2", 12), graph)["amount"] == WIDEN_UNITS.index(8)
    assert resolve_choices(decision(DEEPEN, "fc2"), graph) == {"action": ACTIONS.index(DEEPEN), "layer": fc2}
    with pytest.raises(ChoiceUnresolvable, match="'nope' is not in the graph"):
        resolve_choices(decision(WIDEN, "nope", 4), graph)
    with pytest.raises(ChoiceUnresolvable, match="no amount option is allowed there"):
        resolve_choices(decision(WIDEN, "head", 4), graph)  # the output layer cannot widen


def heuristic_growth_records(count: int) -> list[pb.DecisionRecord | pb.FieldReport]:
    """The heuristic with growth on: it widens on a plateau and waits while the host improves."""
    messages: list[pb.DecisionRecord | pb.FieldReport] = []
    for step in range(count):
        heuristic = HeuristicPolicy(
            HeuristicSettings(plateau_patience=1, germination_cooldown=0, enable_growth=True)
        )
        heuristic.propose(host_packet(1.0))
        packet = host_packet(1.0 if step % 2 == 0 else 0.7)
        packet.packet_id = f"pkt-{step}"
        packet.training_run_id = "run-grow"
        packet.global_step = step * 10
        proposal = heuristic.propose(packet)
        assert proposal.action == (WIDEN if step % 2 == 0 else pb.POLICY_ACTION_WAIT), proposal.reason
        messages.extend(record_for(heuristic, proposal, packet, step=step))
    return messages


def test_imitation_of_the_heuristic_with_growth_on_teaches_the_gnn_its_widens() -> None:
    collector = RecordCollector()
    collector.extend(heuristic_growth_records(16))
    samples, skipped = build_samples(
        lambda: GraphBuilder(settings()), collector.transitions(SimicSettings(min_transitions=8))
    )
    assert not skipped and len(samples) == 16
    widens = [s for s in samples if s.choices["action"] == ACTIONS.index(WIDEN)]
    assert widens and all({"layer", "amount"} <= set(s.choices) for s in widens)
    policy = small_policy()
    before = choice_log_probs(policy, widens)
    imitate(
        policy,
        samples,
        SimicSettings(minibatch_size=16, imitation_epochs=30),
        generator=torch.Generator().manual_seed(0),
    )
    after = choice_log_probs(policy, widens)
    assert float(after.mean()) > float(before.mean()) + 1.0
    evaluation = policy.evaluate_actions([s.graph for s in widens], [s.choices for s in widens])
    assert float(evaluation.log_probs["layer"].detach().exp().mean()) > 0.8
    assert float(evaluation.log_probs["amount"].detach().exp().mean()) > 0.8


def test_an_issued_growth_is_the_growths_transition_not_an_override() -> None:
    """A WIDEN or DEEPEN is issued as a SEED command: its outcome is its own to learn from."""
    records = heuristic_growth_records(2)
    for message in records:
        if isinstance(message, pb.DecisionRecord):
            message.final_command_type = (
                pb.COMMAND_SEED if message.action == WIDEN else pb.COMMAND_WAIT  # as Tamiyo records them
            )
    collector = RecordCollector()
    collector.extend(records)
    transitions = collector.transitions(SimicSettings(min_transitions=2))
    assert "overridden_by_risk_gate" not in transitions.skipped
    assert [t.decision.action for t in transitions.transitions] == [WIDEN, pb.POLICY_ACTION_WAIT]
