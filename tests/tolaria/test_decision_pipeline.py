"""Decisions off the training step's critical path: submitted at step t, collected at t + lag.

Behaviour only (gates and events, never milliseconds): a decision held past its budget is a counted,
CRITICAL miss that applies nothing and stops running; one back in time is applied exactly at t + lag; a
stale one is dropped; only a long streak of misses stops a run; a halt with a decision in flight resumes
exactly.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from esper.leyline import ConfigurationError, DecisionDeadlineMissed, load_settings, pb, sign
from esper.tamiyo import TamiyoService
from esper.tamiyo.model.proposal import Proposal
from esper.tamiyo.runtime.worker import CancelToken, DeadlineExceeded, InferenceWorker
from esper.tolaria.data import Dataset
from esper.tolaria.settings import TolariaSettings
from esper.tolaria.trainer import DecisionsMissed, Trainer
from esper.urza import BlueprintCatalogue
from tests.integration.scripted import ScriptedController
from tests.tamiyo.packets import ScriptedPolicy
from tests.tamiyo.packets import settings as tamiyo_settings
from tests.tolaria.support import SECRET, ScriptedChannel, assert_same_host, events, make_trainer

torch.set_num_threads(1)
WAIT = Proposal(action=pb.POLICY_ACTION_WAIT, log_prob=-0.25, value=0.5, head_choices={"action": 0})


def _decisions(trainer: Trainer) -> list[dict[str, Any]]:
    return list(trainer.run_dir.decisions.read())


class _ServiceController:
    """A Tamiyo service bound as `esper run` binds it (submit/collect), with a scripted policy."""

    def __init__(self, service: TamiyoService) -> None:
        self.service = service

    def prepare(self, packet: pb.SystemStatePacket) -> None:
        self.service.prepare(packet)

    def anticipate(self) -> None:
        self.service.anticipate()

    def evaluate_step(self, packet: pb.SystemStatePacket) -> pb.AdaptationCommand:
        return self.service.evaluate_step(packet)

    def submit(self, packet: pb.SystemStatePacket) -> None:
        self.service.submit(packet)

    def collect(self) -> pb.AdaptationCommand:
        return self.service.collect()

    def export_state(self) -> dict[str, Any]:
        return {}

    def restore_state(self, state: Any) -> None:
        return None

    def checkpointed(self, training_run_id: str, step: int) -> None:
        self.service.checkpointed(training_run_id, step)

    def rewound(self, training_run_id: str, step: int) -> None:
        self.service.rewound(training_run_id, step)


def test_a_decision_held_past_its_budget_is_a_critical_miss_and_training_goes_on(
    tmp_path: Path, dataset: Dataset, catalogue: BlueprintCatalogue
) -> None:
    """The first decision's policy is held by a gate until the run is over: the trainer collects it at
    t + lag, waits no longer than the budget, records a miss (Tamiyo's CRITICAL event and counter, a
    CRITICAL trainer event, the summary's count), applies nothing for it, and trains to the end."""
    policy = ScriptedPolicy(WAIT, block_first=True)
    service = TamiyoService(tamiyo_settings(step_timeout_ms=50.0), policy, SECRET)
    trainer = make_trainer(tmp_path / "run", dataset, catalogue, epochs=1, decision_lag_steps=1)
    trainer.controller = _ServiceController(service)
    try:
        outcome = trainer.fit()
    finally:
        policy.release.set()
        service.close()
    assert outcome.steps == trainer.total_steps
    assert trainer.deadline_misses == 1 and trainer.consecutive_misses == 0
    (missed,) = events(trainer, "decision_deadline_missed")
    assert missed["level"] == "CRITICAL" and missed["step"] == 5 and missed["detail"]["decided_at_step"] == 4
    first, *rest = _decisions(trainer)
    assert first["missed"] is True and "command_id" not in first and "accepted" not in first
    assert rest and all("command_id" in record for record in rest)  # later decisions are applied
    telemetry = service.telemetry
    telemetry.drain()
    assert telemetry.deadline_misses._value.get() == 1
    assert telemetry.health().indicators["deadline_misses"] == 1


def test_a_late_job_stops_at_its_next_checkpoint_even_while_nobody_waits() -> None:
    """The token of a submitted job expires with its deadline: held past it by a gate, the job stops at
    its next checkpoint and never runs what follows, although nobody has collected it yet."""
    worker = InferenceWorker()
    gate = threading.Event()
    ran_on: list[str] = []

    def job(token: CancelToken) -> str:
        gate.wait(30)
        token.check()
        ran_on.append("after the deadline")
        return "late"

    try:
        pending = worker.submit(job, timeout_ms=1.0)
        while time.monotonic() <= pending.deadline:  # the deadline passes while the job is held
            time.sleep(0.001)
        gate.set()
        with pytest.raises(DeadlineExceeded):
            pending.collect()
    finally:
        gate.set()
        worker.close()
    assert ran_on == []
    assert worker.deadline_misses == 1


@pytest.mark.parametrize(("lag", "interval"), [(0, 4), (1, 4), (2, 4), (4, 4), (1, 1)])
def test_a_command_back_in_time_is_applied_exactly_lag_steps_after_its_decision(
    tmp_path: Path, dataset: Dataset, catalogue: BlueprintCatalogue, lag: int, interval: int
) -> None:
    trainer = make_trainer(
        tmp_path / "run", dataset, catalogue, epochs=1, decision_interval=interval, decision_lag_steps=lag
    )
    # Checkpoints only at the end, so that no checkpoint collects a decision early.
    trainer.steps_per_epoch = trainer.total_steps
    trainer.fit()
    records = _decisions(trainer)
    assert records and all("command_id" in r for r in records)
    last = trainer.total_steps
    for record in records:
        # The decision of the last step is collected before the final checkpoint, at that step.
        assert record["applied_step"] == min(record["step"] + lag, last), record
    germinated = next(r for r in records if r.get("operation") == "GERMINATE")
    (transition,) = [e for e in events(trainer, "transition") if e["to_stage"] == "GERMINATED"]
    assert transition["step"] == germinated["applied_step"] == germinated["step"] + lag


def test_a_checkpoint_step_collects_the_decision_in_flight_first(
    tmp_path: Path, dataset: Dataset, catalogue: BlueprintCatalogue
) -> None:
    """Never a checkpoint with a decision in flight: one due after an epoch's end is applied before it."""
    trainer = make_trainer(tmp_path / "run", dataset, catalogue, decision_interval=5, decision_lag_steps=3)
    assert trainer.steps_per_epoch == 8 and trainer.total_steps == 16  # checkpoints at 8 and 16
    trainer.fit()
    by_step = {r["step"]: r for r in _decisions(trainer)}
    assert by_step[5]["applied_step"] == 8 and by_step[10]["applied_step"] == 13  # due at those steps
    assert by_step[15]["applied_step"] == 16  # due at 18: collected before the checkpoint at 16


class _Interfering(ScriptedController):
    """Plans a GERMINATE of h1 at submit; before it is collected, another command germinates h1."""

    def __init__(self, trainer_ref: list[Trainer]) -> None:
        super().__init__(SECRET, germinate=("h1",), blueprints={"h1": "mlp_small"})
        self.trainer_ref = trainer_ref
        self.interfered = False

    def collect(self) -> pb.AdaptationCommand:
        command = super().collect()
        if command.HasField("seed_operation") and not self.interfered:
            self.interfered = True
            other = pb.AdaptationCommand()
            other.CopyFrom(command)
            other.command_id = "interfering"
            other.ClearField("signature")
            trainer = self.trainer_ref[0]
            assert trainer.manager.apply(sign(other, SECRET), step=trainer.step).accepted
        return command


def test_a_command_made_stale_while_in_flight_is_dropped_with_an_event(
    tmp_path: Path, dataset: Dataset, catalogue: BlueprintCatalogue
) -> None:
    trainer = make_trainer(tmp_path / "run", dataset, catalogue, epochs=1, decision_lag_steps=2)
    controller = _Interfering([trainer])
    trainer.controller = controller
    trainer.fit()
    (dropped,) = events(trainer, "decision_dropped")
    assert "slot h1 changed" in dropped["reason"] and "DORMANT" in dropped["reason"]
    record = next(r for r in _decisions(trainer) if r.get("dropped"))
    assert record["accepted"] is False and record["command_id"] == dropped["detail"]["command_id"]
    germinations = [e for e in events(trainer, "transition") if e["to_stage"] == "GERMINATED"]
    assert len(germinations) == 1  # only the interfering command reached Kasmina


class _Missing(ScriptedController):
    """Misses its deadline on the decisions listed (by number, from 1), answers in time otherwise."""

    def __init__(self, misses: set[int]) -> None:
        super().__init__(SECRET, germinate=("h1",), blueprints={"h1": "mlp_small"})
        self.misses = misses

    def collect(self) -> pb.AdaptationCommand:
        command = super().collect()
        if self.decisions in self.misses:
            raise DecisionDeadlineMissed(f"decision {self.decisions} was late (scripted)")
        return command


def test_a_few_late_decisions_never_stop_a_run(
    tmp_path: Path, dataset: Dataset, catalogue: BlueprintCatalogue
) -> None:
    trainer = make_trainer(tmp_path / "run", dataset, catalogue, epochs=4, max_consecutive_misses=3)
    trainer.controller = _Missing({1, 2, 4, 5, 7, 8})  # never three in a row
    outcome = trainer.fit()
    assert outcome.steps == trainer.total_steps
    assert trainer.deadline_misses == 6 == len(events(trainer, "decision_deadline_missed"))


def test_a_long_streak_of_misses_stops_the_run(
    tmp_path: Path, dataset: Dataset, catalogue: BlueprintCatalogue
) -> None:
    trainer = make_trainer(tmp_path / "run", dataset, catalogue, max_consecutive_misses=3)
    trainer.controller = _Missing({2, 3, 4, 5})
    with pytest.raises(DecisionsMissed, match="missed its deadline on 3 decisions in a row") as caught:
        trainer.fit()
    assert isinstance(caught.value.last_error, DecisionDeadlineMissed)
    assert trainer.deadline_misses == 3


def test_a_halt_waits_for_the_decision_in_flight_then_resume_equals_an_uninterrupted_run(
    tmp_path: Path, dataset: Dataset, catalogue: BlueprintCatalogue
) -> None:
    lag = {"decision_lag_steps": 2}
    reference = make_trainer(tmp_path / "reference", dataset, catalogue, **lag)
    expected = reference.fit()

    # Poll 14 comes before step 14, while the decision of step 12 is in flight (due at 14).
    halted = make_trainer(tmp_path / "halted", dataset, catalogue, channel=ScriptedChannel(14), **lag)
    outcome = halted.fit()
    assert outcome.halted and outcome.steps == 14
    assert next(r for r in _decisions(halted) if r["step"] == 12)["applied_step"] == 14

    resumed = make_trainer(tmp_path / "halted", dataset, catalogue, **lag)
    assert resumed.resume() and resumed.step == 14
    final = resumed.fit()
    assert final.evaluation == expected.evaluation and final.parameters == expected.parameters
    assert_same_host(resumed, reference)


def test_the_lag_cannot_exceed_the_decision_interval() -> None:
    with pytest.raises(ConfigurationError, match="decision_lag_steps"):
        load_settings(TolariaSettings, environ={}, decision_interval=4, decision_lag_steps=5)
