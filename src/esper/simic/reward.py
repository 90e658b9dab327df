"""The reward of one decision, from the outcome its field report measured over the observation window.

Deliberately simple (DESIGN §10): change in validation accuracy, decrease in validation loss, the seed's
counterfactual accuracy contribution when Kasmina measured it, minus a cost per thousand parameters
added. The weights live in `SimicSettings`. A report that did not measure the accuracy or loss change
gives no reward at all (unmeasured is not zero): its decision is left out and counted.

A germination's own window sees only its cost: the seed trains in isolation (alpha 0) while the window
is open, and what it is worth shows only when its life ends. So a germination is also paid its seed's
counterfactual contribution as measured at the fossilisation or cull that ended it (`with_seed_outcome`);
without it, PPO learns that never growing is the safe choice. A WIDEN or DEEPEN is paid the same way:
its growth's new units (or block) have the same lifecycle, are measured the same way (accuracy with
them minus with their contribution zeroed) and are kept (merged into the layer) or culled by a
FOSSILIZE or CULL whose report carries the figure (`END_CONTRIBUTION_ACCURACY`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from esper.leyline import EsperError, pb
from esper.simic.settings import SimicSettings

PARAM_COUNT = "param_count"  # `SystemStatePacket.training_metrics`: the model's size at the decision

# Keys of `FieldReport.metrics` the reward reads.
ACCURACY_DELTA = "accuracy_delta"  # validation accuracy at window close minus at the decision
LOSS_DELTA = "loss_delta"  # validation loss at window close minus at the decision
PARAM_DELTA = "param_delta"  # parameters added over the window (negative when removed)
CONTRIBUTION_ACCURACY = "contribution_accuracy"  # accuracy with the seed minus with its alpha forced to 0
# On a FOSSILIZE or CULL: the contribution of the seed or growth it ended, as measured for that decision.
END_CONTRIBUTION_ACCURACY = "end_contribution_accuracy"
REQUIRED_KEYS: tuple[str, ...] = (ACCURACY_DELTA, LOSS_DELTA)


class UnmeasuredOutcome(EsperError):
    """A field report lacks (or has non-finite) figures the reward needs."""

    def __init__(self, report_id: str, keys: tuple[str, ...]) -> None:
        self.report_id = report_id
        self.keys = keys
        super().__init__(f"field report {report_id} did not measure {', '.join(keys)}")


@dataclass(frozen=True)
class Reward:
    """A reward and its terms (kept for reporting what the learner was paid for)."""

    total: float
    accuracy: float
    loss: float
    contribution: float
    param_cost: float
    seed_outcome: float = 0.0


def _finite(report: pb.FieldReport, key: str) -> float | None:
    if key not in report.metrics:
        return None
    value = float(report.metrics[key])
    return value if math.isfinite(value) else None


def reward_of(report: pb.FieldReport, settings: SimicSettings) -> Reward:
    """The reward for the decision `report` closes; `UnmeasuredOutcome` if the outcome was not measured."""
    missing = tuple(key for key in REQUIRED_KEYS if _finite(report, key) is None)
    if missing:
        raise UnmeasuredOutcome(report.report_id, missing)
    accuracy = settings.reward_accuracy_weight * (_finite(report, ACCURACY_DELTA) or 0.0)
    loss = -settings.reward_loss_weight * (_finite(report, LOSS_DELTA) or 0.0)
    measured_contribution = _finite(report, CONTRIBUTION_ACCURACY)
    contribution = settings.reward_contribution_weight * (measured_contribution or 0.0)
    params = _finite(report, PARAM_DELTA) or 0.0
    param_cost = settings.reward_param_cost * params / 1000.0
    return _reward(settings, accuracy=accuracy, loss=loss, contribution=contribution, param_cost=param_cost)


def _reward(
    settings: SimicSettings,
    *,
    accuracy: float,
    loss: float,
    contribution: float,
    param_cost: float,
    seed_outcome: float = 0.0,
) -> Reward:
    """The terms and their clipped sum."""
    total = accuracy + loss + contribution + seed_outcome - param_cost
    return Reward(
        total=max(-settings.reward_clip, min(settings.reward_clip, total)),
        accuracy=accuracy,
        loss=loss,
        contribution=contribution,
        param_cost=param_cost,
        seed_outcome=seed_outcome,
    )


def with_seed_outcome(reward: Reward, contribution_accuracy: float, settings: SimicSettings) -> Reward:
    """`reward` of a germination (or a WIDEN or DEEPEN) plus the contribution of its seed (or growth)
    measured at the end of that seed's (or growth's) life."""
    seed_outcome = settings.reward_seed_outcome_weight * contribution_accuracy
    return _reward(
        settings,
        accuracy=reward.accuracy,
        loss=reward.loss,
        contribution=reward.contribution,
        param_cost=reward.param_cost,
        seed_outcome=seed_outcome,
    )


def episode_objective(decision: pb.DecisionRecord, report: pb.FieldReport, settings: SimicSettings) -> float:
    """The run's outcome as measured when the window of its last decision closed: validation accuracy then
    minus `reward_param_cost` per 1000 parameters of the model then (the benchmark's objective)."""
    packet = decision.packet
    accuracy = float(packet.validation_accuracy) + (_finite(report, ACCURACY_DELTA) or 0.0)
    params = float(packet.training_metrics.get(PARAM_COUNT, 0.0)) + (_finite(report, PARAM_DELTA) or 0.0)
    return accuracy - settings.reward_param_cost * params / 1000.0


def episode_step_reward(reward: Reward, *, last: bool, objective: float) -> Reward:
    """A decision's reward under `reward_mode="episode"`: its seed's counterfactual outcome (germinations,
    already in `reward.seed_outcome`) and, for the run's last decision, the run's `objective`."""
    return Reward(
        total=reward.seed_outcome + (objective if last else 0.0),
        accuracy=objective if last else 0.0,
        loss=0.0,
        contribution=0.0,
        param_cost=0.0,
        seed_outcome=reward.seed_outcome,
    )
