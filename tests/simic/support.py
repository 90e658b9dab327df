"""Decision records and field reports from a tiny synthetic world, for Simic's tests."""

from __future__ import annotations

import uuid

from esper.leyline import pb
from esper.simic.reward import ACCURACY_DELTA, LOSS_DELTA, PARAM_DELTA
from esper.tamiyo.model.heuristic import HeuristicPolicy, HeuristicSettings
from esper.tamiyo.model.normalizer_state import statistics_to_proto
from esper.tamiyo.model.policy import GNNPolicy
from esper.tamiyo.model.proposal import Policy, Proposal
from tests.tamiyo.packets import make_packet

# The synthetic world pays for germinating (and a little for culling), nothing for waiting.
PAYOFF = {
    pb.POLICY_ACTION_GERMINATE: (0.05, -0.05, 500.0),
    pb.POLICY_ACTION_CULL: (0.01, 0.0, -500.0),
}


def packet_at(step: int, run_id: str) -> pb.SystemStatePacket:
    """A packet whose slots vary with the step (some dormant, some active)."""
    stages = {0: pb.SEED_STAGE_TRAINING} if step % 3 == 0 else {}
    if step % 5 == 0:
        stages[1] = pb.SEED_STAGE_PROBATIONARY
    packet = make_packet(n_layers=3, n_slots=3, n_blueprints=2, stages=stages)
    packet.packet_id = f"pkt-{run_id}-{step}"
    packet.training_run_id = run_id
    packet.global_step = step * 10
    packet.validation_loss = 1.0 - 0.01 * step
    packet.validation_accuracy = 0.5 + 0.005 * step
    return packet


def record_for(
    policy: Policy, proposal: Proposal, packet: pb.SystemStatePacket, *, step: int
) -> tuple[pb.DecisionRecord, pb.FieldReport]:
    command_id = f"cmd-{uuid.uuid4().hex}"
    record = pb.DecisionRecord(
        decision_id=f"dec-{command_id}",
        command_id=command_id,
        training_run_id=packet.training_run_id,
        action=proposal.action,
        log_prob=proposal.log_prob,
        value_estimate=proposal.value,
        policy_version=policy.version,
        slot_id=proposal.slot_id,
        blueprint_id=proposal.blueprint_id,
    )
    record.packet.CopyFrom(packet)
    record.issued_at.FromNanoseconds(1_700_000_000_000_000_000 + step)
    record.head_choices.update(proposal.head_choices)
    record.head_log_probs.update(proposal.head_log_probs)
    record.normalizer.extend(statistics_to_proto(proposal.normalized_with))
    if proposal.layer_id:  # as Tamiyo's records store a growth's layer and amount
        record.growth.layer_id = proposal.layer_id
        record.growth.units = proposal.units
    accuracy, loss, params = PAYOFF.get(proposal.action, (0.0, 0.0, 0.0))
    report = pb.FieldReport(
        report_id=f"fr-{command_id}",
        command_id=command_id,
        training_run_id=packet.training_run_id,
        outcome=pb.FIELD_REPORT_OUTCOME_SUCCESS if accuracy > 0 else pb.FIELD_REPORT_OUTCOME_NEUTRAL,
        observation_window_epochs=1,
        tamiyo_policy_version=policy.version,
        action=proposal.action,
    )
    report.issued_at.FromNanoseconds(1_700_000_000_000_000_000 + step)
    report.metrics.update({ACCURACY_DELTA: accuracy, LOSS_DELTA: loss, PARAM_DELTA: params})
    return record, report


def gnn_records(
    policy: GNNPolicy, count: int, run_id: str = "run-a"
) -> list[pb.DecisionRecord | pb.FieldReport]:
    """`count` decisions sampled by `policy`, each with its report."""
    messages: list[pb.DecisionRecord | pb.FieldReport] = []
    for step in range(count):
        packet = packet_at(step, run_id)
        messages.extend(record_for(policy, policy.propose(packet), packet, step=step))
    return messages


def heuristic_records(count: int, run_id: str = "run-h") -> list[pb.DecisionRecord | pb.FieldReport]:
    """`count` decisions of the heuristic on a plateauing run."""
    heuristic = HeuristicPolicy(
        HeuristicSettings(plateau_patience=1, germination_cooldown=0, max_active_seeds=3)
    )
    messages: list[pb.DecisionRecord | pb.FieldReport] = []
    for step in range(count):
        # A plateau throughout; every other packet has every slot busy, so the heuristic must wait.
        busy = step % 2 == 0
        packet = make_packet(
            n_layers=3, n_slots=3, stages=dict.fromkeys(range(3), pb.SEED_STAGE_TRAINING) if busy else {}
        )
        packet.packet_id = f"pkt-{run_id}-{step}"
        packet.training_run_id = run_id
        packet.global_step = step * 10
        packet.validation_loss = 0.8
        messages.extend(record_for(heuristic, heuristic.propose(packet), packet, step=step))
    return messages
