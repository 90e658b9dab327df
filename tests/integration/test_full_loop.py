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
from pathlib import Path

import torch

from esper.kasmina import SeedManager
from esper.leyline import SignatureVerifier, pb
from esper.oona import EmbeddedBus, OonaSettings, Streams
from esper.simic.settings import SimicSettings
from esper.simic.trainer import RoundResult, SimicTrainer, bus_publisher, offline_records
from esper.tamiyo.model.policy import GNNPolicy
from esper.tamiyo.records.store import TamiyoStore
from esper.tamiyo.runtime.service import TamiyoService
from esper.tamiyo.runtime.update_feed import PolicyUpdateFeed
from esper.tamiyo.runtime.updates import PolicyUpdateIntake
from esper.tamiyo.settings import TamiyoSettings
from esper.tolaria.controller import BoundController
from esper.tolaria.hosts import build_host
from esper.tolaria.records import RunDirectory
from esper.tolaria.run import load_task
from esper.tolaria.trainer import EpochReport, Trainer
from esper.urza import BlueprintCatalogue
from tests.integration.run_worker import SECRET, config
from tests.tamiyo.packets import SMALL

torch.set_num_threads(1)


def _wait_for_reports(bus: EmbeddedBus, count: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lengths = {s.stream: s.length for s in bus.stats()}
        if lengths.get(Streams.FIELD_REPORTS, 0) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} field reports reached the bus in {timeout_s}s")


def test_train_decide_report_learn_swap_and_train_again(tmp_path: Path) -> None:
    cfg = config(tmp_path / "run", epochs=8)
    bus = EmbeddedBus(tmp_path / "bus.sqlite3", OonaSettings())
    store = TamiyoStore(cfg.run_dir / "tamiyo.sqlite3")
    tamiyo_settings = TamiyoSettings(step_timeout_ms=10_000.0, fr_obs_window_epochs=1, fr_outbox_poll_ms=20.0)
    policy = GNNPolicy(tamiyo_settings, config=SMALL)
    service = TamiyoService(tamiyo_settings, policy, SECRET, store=store, bus=bus)
    intake = PolicyUpdateIntake(
        service,
        policy,
        SECRET,
        tamiyo_settings,
        config=SMALL,
        feed=PolicyUpdateFeed(bus, "tamiyo-run-integration"),
        archive=cfg.run_dir / "policies",
        lineage=store,
    )
    learner = SimicTrainer(
        SimicSettings(min_transitions=8, minibatch_size=16, regression_tolerance=10.0, max_kl=10.0),
        tamiyo_settings,
        GNNPolicy(tamiyo_settings, config=SMALL),
        SECRET,
        publish=bus_publisher(bus),
    )
    dataset = load_task("digits", "mlp", seed=cfg.tolaria.seed, difficulty=0.5)
    host = build_host("mlp", dataset.input_shape, dataset.num_classes)
    catalogue = BlueprintCatalogue.open_default(tmp_path / "urza.sqlite3")
    rounds: list[RoundResult] = []
    initial_version = service.policy_version
    try:
        manager = SeedManager(
            host.slots(),
            catalogue,
            SignatureVerifier(SECRET, freshness_s=cfg.kasmina.command_freshness_s),
            cfg.kasmina,
            training_run_id=cfg.training_run_id,
        )
        trainer = Trainer(
            settings=cfg.tolaria,
            dataset=dataset,
            host=host,
            manager=manager,
            controller=BoundController(
                decide=service.evaluate_step, save=service.export_state, load=service.restore_state
            ),
            blueprint_ids=catalogue.ids_for("mlp"),
            run_dir=RunDirectory(cfg.run_dir),
            training_run_id=cfg.training_run_id,
        )

        def learn_halfway(report: EpochReport) -> None:
            if report.epoch != 4:
                return
            _wait_for_reports(bus, 12)
            records = offline_records(bus)
            rounds.append(learner.run_round(records.transitions(learner.settings), mode="ppo"))

        trainer.fit(on_epoch=learn_halfway)
    finally:
        service.close()
        catalogue.close()

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
    store.close()
    bus.close()
