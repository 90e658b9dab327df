"""A WIDEN or DEEPEN is credited its growth's contribution at the end of the growth's life, as a
germination is its seed's: one code path (`_credit_growth_outcomes`) for both."""

from __future__ import annotations

from collections.abc import Collection

import pytest

from esper.leyline import pb
from esper.simic.reward import ACCURACY_DELTA, END_CONTRIBUTION_ACCURACY, LOSS_DELTA, PARAM_DELTA
from esper.simic.settings import SimicSettings
from esper.simic.transitions import RecordCollector, TransitionSet

SETTINGS = SimicSettings(reward_seed_outcome_weight=2.0, reward_param_cost=0.01)
WIDEN, DEEPEN = pb.POLICY_ACTION_WIDEN, pb.POLICY_ACTION_DEEPEN
FOSSILIZE, CULL = pb.POLICY_ACTION_FOSSILIZE, pb.POLICY_ACTION_CULL
GERMINATE, WAIT = pb.POLICY_ACTION_GERMINATE, pb.POLICY_ACTION_WAIT


def collect(
    steps: dict[int, tuple[int, str, float | None]],
    *,
    still_shown: Collection[int] = (),
    unmeasured_windows: Collection[int] = (),
) -> TransitionSet:
    """step -> (action, the report's seed id, end figure on that report). `still_shown`: steps whose
    growth the packets still carried when the window closed (the report names the growth, with its
    stage); `unmeasured_windows`: steps whose window measured nothing (aborted at the end of the run)."""
    collector = RecordCollector()
    for step, (action, seed_id, figure) in steps.items():
        decision = pb.DecisionRecord(command_id=f"c{step}", training_run_id="r", action=action)
        decision.packet.global_step = step
        if action in (WIDEN, DEEPEN):
            decision.growth.layer_id = seed_id.split(":")[0]
            decision.growth.units = 4 if action == WIDEN else 0
        report = pb.FieldReport(
            report_id=f"fr-{step}", command_id=f"c{step}", training_run_id="r", seed_id=seed_id
        )
        if step not in unmeasured_windows:
            params = 1000.0 if action in (WIDEN, DEEPEN, GERMINATE) else 0.0
            report.metrics.update({ACCURACY_DELTA: 0.0, LOSS_DELTA: 0.0, PARAM_DELTA: params})
        if step in still_shown:
            report.metrics["growth_stage"] = float(pb.SEED_STAGE_TRAINING)
        if figure is not None:
            report.metrics[END_CONTRIBUTION_ACCURACY] = figure
        collector.add_decision(decision)
        collector.add_report(report)
    return collector.transitions(SETTINGS)


def rewards(result: TransitionSet) -> dict[int, float]:
    return {t.decision.packet.global_step: t.reward.seed_outcome for t in result.transitions}


def test_a_widen_is_credited_its_units_contribution_measured_when_they_were_kept() -> None:
    result = collect(
        {0: (WIDEN, "fc1:w1", None), 1: (WAIT, "", None), 2: (FOSSILIZE, "fc1:w1", 0.05)}, still_shown={0}
    )
    paid = {t.decision.packet.global_step: t.reward for t in result.transitions}
    assert paid[0].seed_outcome == pytest.approx(0.10)  # 2.0 x 0.05
    assert paid[0].total == pytest.approx(0.10 - 0.01)  # its own window still pays its parameter cost
    assert paid[1].seed_outcome == paid[2].seed_outcome == 0.0  # only the start is credited
    assert result.outcomes == {"credited": 1}


def test_a_widen_kept_before_its_window_closed_is_found_by_its_layer() -> None:
    """Its report names the layer (the merged units no longer show), so it takes the nearest later end of
    a widen of that layer; an earlier widen of the layer takes the end after it, a deepen is apart."""
    result = collect(
        {
            0: (WIDEN, "fc1", None),
            1: (CULL, "fc1:w1", -0.03),
            2: (DEEPEN, "fc1", None),
            3: (WIDEN, "fc1", None),
            4: (FOSSILIZE, "fc1:w2", 0.02),
            5: (FOSSILIZE, "fc1:d3", 0.04),
        }
    )
    assert rewards(result) == pytest.approx({0: -0.06, 1: 0.0, 2: 0.08, 3: 0.04, 4: 0.0, 5: 0.0})
    assert result.outcomes == {"credited": 3}


def test_a_growth_that_ended_unmeasured_adds_nothing_and_is_counted() -> None:
    result = collect(
        {
            0: (WIDEN, "fc1:w1", None),
            1: (CULL, "fc1:w1", None),  # culled before any counterfactual: no figure
            2: (DEEPEN, "fc2:d2", None),  # never ended in the records
            3: (GERMINATE, "s0:g1", None),
            4: (FOSSILIZE, "s0:g1", 0.03),
        },
        still_shown={0, 2},
    )
    assert rewards(result) == pytest.approx({0: 0.0, 1: 0.0, 2: 0.0, 3: 0.06, 4: 0.0})
    assert result.outcomes == {"credited": 1, "ended_unmeasured": 1, "not_ended": 1}


def test_an_end_whose_own_window_was_not_measured_still_credits_its_start() -> None:
    """The run ended before the keep's window closed (an ABORTED report): no transition for the keep, but
    its figure, measured at the decision, still reaches the WIDEN."""
    result = collect(
        {0: (WIDEN, "fc1:w1", None), 1: (FOSSILIZE, "fc1:w1", 0.05)}, still_shown={0}, unmeasured_windows={1}
    )
    assert rewards(result) == pytest.approx({0: 0.10})
    assert result.skipped["outcome_not_measured"] == 1


def test_the_last_end_attempt_of_a_life_is_its_end() -> None:
    """A FOSSILIZE refused because G4 had not passed yet is followed by the one that keeps the seed or
    growth: the start is paid the figure of the keep, not of the refused attempt."""
    result = collect(
        {
            0: (GERMINATE, "s0:g1", None),
            1: (WIDEN, "fc1:w1", None),
            2: (FOSSILIZE, "s0:g1", 0.01),  # refused
            3: (FOSSILIZE, "fc1:w1", 0.02),  # refused
            4: (FOSSILIZE, "s0:g1", 0.03),  # kept
            5: (FOSSILIZE, "fc1:w1", 0.05),  # kept
            6: (GERMINATE, "s0:g1", None),  # the slot's next seed, still alive
        },
        still_shown={1},
    )
    assert rewards(result) == pytest.approx({0: 0.06, 1: 0.10, 2: 0.0, 3: 0.0, 4: 0.0, 5: 0.0, 6: 0.0})
    assert result.outcomes == {"credited": 2, "not_ended": 1}
