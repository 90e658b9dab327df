"""The whole loop on the embedded bus: train -> decide -> report -> Simic update -> hot swap -> train again.

One Tolaria run on digits under Tamiyo's GNN policy (narrow layers, sampling). Tamiyo records every
decision in its store and its outbox publishes decision records and field reports on the bus. Halfway
through the run, Simic reads them from the bus, trains a PPO round on Tamiyo's own policy class and
publishes a signed update; the *running* Tamiyo picks it up between two decisions, and the rest of the run
is decided, and reported, under the new version. A second Simic round then learns from the decisions of
both versions.

The validation bounds of Simic are loosened here: this test proves the plumbing of the loop, not the
quality of what one short round learns (that is `benchmarks/policy_quality.py`'s job).
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from esper.assembly import RunAssembly
from esper.leyline import pb
from esper.oona import Bus, Streams
from esper.simic.settings import SimicSettings
from esper.simic.trainer import RoundResult, SimicTrainer, bus_publisher, offline_records
from esper.tamiyo import GNNPolicy
from esper.tamiyo.settings import TamiyoSettings
from esper.tolaria.trainer import EpochReport
from tests.integration.run_worker import SECRET, config, run_settings
from tests.tamiyo.packets import SMALL

torch.set_num_threads(1)


def _wait_for_reports(bus: Bus, count: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lengths = {s.stream: s.length for s in bus.stats()}
        if lengths.get(Streams.FIELD_REPORTS, 0) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} field reports reached the bus in {timeout_s}s")


def test_train_decide_report_learn_swap_and_train_again(tmp_path: Path) -> None:
    cfg = config(tmp_path / "run", epochs=8)
    tamiyo_settings = TamiyoSettings(step_timeout_ms=10_000.0, fr_obs_window_epochs=1, fr_outbox_poll_ms=20.0)
    # As `esper run --policy gnn` builds it: one bus (the embedded file in tmp_path), Tamiyo's store in the
    # run directory, the policy-update feed; here with a narrow GNN.
    settings = replace(run_settings(tmp_path), tamiyo=tamiyo_settings)
    policy = GNNPolicy(tamiyo_settings, config=SMALL)
    rounds: list[RoundResult] = []
    with RunAssembly(settings, cfg, secret=SECRET, policy=policy) as run:
        assert run.bus is not None and run.store is not None and run.tamiyo is not None
        bus, store, service, intake = run.bus, run.store, run.tamiyo.service, run.tamiyo.intake
        assert intake is not None  # a GNN takes policy updates
        learner = SimicTrainer(
            SimicSettings(min_transitions=8, minibatch_size=16, regression_tolerance=10.0, max_kl=10.0),
            tamiyo_settings,
            GNNPolicy(tamiyo_settings, config=SMALL),
            SECRET,
            publish=bus_publisher(bus),
        )
        initial_version = service.policy_version

        def learn_halfway(report: EpochReport) -> None:
            if report.epoch != 4:
                return
            _wait_for_reports(bus, 12)
            records = offline_records(bus)
            rounds.append(learner.run_round(records.transitions(learner.settings), mode="ppo"))

        run.train(on_epoch=learn_halfway)

        first = rounds[0]
        assert first.published, first.reasons
        assert first.parent_version == initial_version  # Simic started from the policy Tamiyo was running
        assert math.isfinite(first.metrics["ppo.approx_kl"])
        assert "ppo.explained_variance" in first.metrics and "ppo.entropy.action" in first.metrics
        # The running Tamiyo swapped the update in between two decisions.
        assert service.policy_version == first.version != initial_version
        assert intake.serving.sequence == 1
        assert [record.version for record in store.policy_lineage()][-2:] == [initial_version, first.version]

        # Decisions and reports after the swap carry the new version.
        records = offline_records(bus)
        reports = [m for m in records.messages() if isinstance(m, pb.FieldReport)]
        versions = {report.tamiyo_policy_version for report in reports}
        assert versions == {initial_version, first.version}
        decisions = [m for m in records.messages() if isinstance(m, pb.DecisionRecord)]
        assert all(d.policy_version in versions for d in decisions)

        # Train again: a second round learns from the decisions of both versions, starting from the new one.
        second = learner.run_round(records.transitions(learner.settings), mode="ppo")
        assert second.parent_version == first.version
        assert second.on_policy > first.on_policy
        assert second.published, second.reasons
