"""Honest learning: the episode's outcome as the reward, credited through returns; behaviour cloning kept
as an auxiliary loss during PPO."""

from __future__ import annotations

import math

import pytest
import torch

from esper.leyline import pb
from esper.simic.ppo import choice_nll, make_rollout, ppo_update
from esper.simic.reward import ACCURACY_DELTA, CONTRIBUTION_ACCURACY, LOSS_DELTA, PARAM_COUNT, PARAM_DELTA
from esper.simic.settings import SimicSettings
from esper.simic.transitions import RecordCollector, Sample, build_samples
from esper.simic.validation import agreement
from esper.tamiyo.model.builder import GraphBuilder
from esper.tamiyo.model.policy import GNNPolicy
from tests.simic.support import gnn_records, heuristic_records
from tests.tamiyo.packets import settings, small_policy


def _run(actions: list[tuple[int, str, float | None]], run_id: str = "r") -> RecordCollector:
    """One run: (action, seed id, contribution measured in the window) per decision; the model grows by
    1000 parameters per germination and the accuracy rises 0.01 per window."""
    collector = RecordCollector()
    params = 2000.0
    for step, (action, seed_id, contribution) in enumerate(actions):
        decision = pb.DecisionRecord(command_id=f"{run_id}-{step}", training_run_id=run_id, action=action)
        decision.packet.global_step = step
        decision.packet.validation_accuracy = 0.5 + 0.01 * step
        decision.packet.training_metrics[PARAM_COUNT] = params
        grows = 1000.0 if action == pb.POLICY_ACTION_GERMINATE else 0.0
        params += grows
        report = pb.FieldReport(
            report_id=f"fr-{run_id}-{step}",
            command_id=f"{run_id}-{step}",
            training_run_id=run_id,
            seed_id=seed_id,
        )
        report.metrics.update({ACCURACY_DELTA: 0.01, LOSS_DELTA: -0.1, PARAM_DELTA: grows})
        if contribution is not None:
            report.metrics[CONTRIBUTION_ACCURACY] = contribution
        collector.add_decision(decision)
        collector.add_report(report)
    return collector


def test_the_episode_reward_is_the_runs_objective_at_its_last_decision() -> None:
    s = SimicSettings(reward_mode="episode", reward_param_cost=0.02, reward_seed_outcome_weight=1.0)
    collector = _run(
        [
            (pb.POLICY_ACTION_GERMINATE, "h1", None),
            (pb.POLICY_ACTION_WAIT, "", None),
            (pb.POLICY_ACTION_FOSSILIZE, "h1", 0.04),
            (pb.POLICY_ACTION_WAIT, "", None),
        ]
    )
    transitions = collector.transitions(s).transitions
    rewards = [t.reward.total for t in transitions]
    # Last decision: accuracy 0.53 at its window's close + 0.01, minus 0.02 x 3 kparams.
    objective = (0.53 + 0.01) - 0.02 * 3.0
    assert rewards == pytest.approx([0.04, 0.0, 0.0, objective])  # the germination keeps its seed's worth
    assert [t.done for t in transitions] == [False, False, False, True]


def test_the_episode_reward_ranks_runs_by_outcome_not_by_window_noise() -> None:
    """Two runs: one grows (its windows each pay the parameter cost), one never does. Per window, the
    grower's germination looks bad; by episode, the run that ends better is paid more."""
    window = SimicSettings(reward_mode="window", reward_param_cost=0.02, reward_seed_outcome_weight=0.0)
    episode = window.model_copy(update={"reward_mode": "episode"})
    grower = _run([(pb.POLICY_ACTION_GERMINATE, "h1", None), (pb.POLICY_ACTION_WAIT, "", None)], "grower")
    grower_decisions = [m for m in grower.messages() if isinstance(m, pb.DecisionRecord)]
    for decision in grower_decisions[1:]:
        decision.packet.validation_accuracy += 0.2  # growth paid off after the germination
        grower.add_decision(decision)
    waiter = _run([(pb.POLICY_ACTION_WAIT, "", None), (pb.POLICY_ACTION_WAIT, "", None)], "waiter")
    combined = RecordCollector()
    combined.extend([*grower.messages(), *waiter.messages()])

    def paid(s: SimicSettings, run: str) -> float:
        return sum(
            t.reward.total for t in combined.transitions(s).transitions if t.decision.training_run_id == run
        )

    assert paid(window, "grower") < paid(window, "waiter")  # the germination's window paid its cost only
    assert paid(episode, "grower") > paid(episode, "waiter")


def heuristic_nll(policy: GNNPolicy, samples: list[Sample]) -> float:
    """How unlikely `policy` finds the heuristic's recorded choices (mean negative log-likelihood)."""
    with torch.no_grad():
        return float(
            choice_nll(
                policy.evaluate_actions([s.graph for s in samples], [s.choices for s in samples]), samples
            )
        )


def test_behaviour_cloning_kept_during_ppo_holds_the_heuristics_choices() -> None:
    """PPO on rewards that favour the GNN's own choices drifts from the heuristic; with `bc_coef` the
    imitation loss is part of every minibatch and the agreement with the heuristic stays higher."""
    heuristic = RecordCollector()
    heuristic.extend(heuristic_records(48))
    imitation, _ = build_samples(lambda: GraphBuilder(settings()), heuristic.transitions(SimicSettings()))
    policy = small_policy()
    collector = RecordCollector()
    collector.extend(gnn_records(policy, 48))
    samples, _ = build_samples(lambda: GraphBuilder(settings()), collector.transitions(SimicSettings()))

    def trained(bc_coef: float) -> tuple[GNNPolicy, float]:
        s = SimicSettings(
            learning_rate=3e-3, update_epochs=6, target_kl=10.0, minibatch_size=16, bc_coef=bc_coef
        )
        candidate = small_policy()
        candidate.load_state_bytes(policy.state_bytes())
        stats = ppo_update(
            candidate,
            make_rollout(candidate, samples, s),
            s,
            generator=torch.Generator().manual_seed(0),
            imitation=imitation,
        )
        return candidate, stats.bc_loss

    plain, plain_bc = trained(0.0)
    cloned, bc_loss = trained(5.0)
    assert math.isnan(plain_bc) and math.isfinite(bc_loss)
    assert heuristic_nll(cloned, imitation) < heuristic_nll(plain, imitation)
    assert agreement(cloned, imitation) >= agreement(plain, imitation)
