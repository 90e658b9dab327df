"""`esper simic report`'s series: every per-head figure of every round that measured it, gaps kept."""

from __future__ import annotations

from pathlib import Path

from esper.simic.report import PLOTS, _series
from esper.simic.state import RoundResult, SimicState


def test_per_head_figures_are_plotted_and_unmeasured_rounds_are_gaps(tmp_path: Path) -> None:
    state = SimicState(tmp_path)
    state.record(
        RoundResult(mode="imitation", published=True, parent_version="v0", metrics={"imitation.loss": 1.0})
    )
    state.record(
        RoundResult(
            mode="ppo",
            published=True,
            parent_version="v1",
            metrics={
                "ppo.explained_variance": 0.25,
                "ppo.entropy": 2.0,
                "ppo.entropy.action": 1.5,
                "ppo.entropy.slot": 0.5,
                "ppo.kl.action": 0.01,
                "ppo.clip_fraction": 0.1,
                "ppo.approx_kl": float("nan"),  # not measured: recorded as null, plotted as a gap
            },
        )
    )
    rounds = state.rounds()
    assert _series(rounds, PLOTS["critic.png"][2]) == {"ppo.explained_variance": [(1, 0.25)]}
    assert _series(rounds, PLOTS["entropy.png"][2]) == {
        "ppo.entropy": [(1, 2.0)],
        "ppo.entropy.action": [(1, 1.5)],
        "ppo.entropy.slot": [(1, 0.5)],
    }
    assert _series(rounds, PLOTS["kl.png"][2]) == {
        "ppo.kl.action": [(1, 0.01)],
        "ppo.clip_fraction": [(1, 0.1)],
    }
    assert _series(rounds, PLOTS["losses.png"][2]) == {"imitation.loss": [(0, 1.0)]}
