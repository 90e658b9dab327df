"""Trainer: rollback on a loss explosion, divergence, and the emergency halt (checkpoint, event, stop)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from esper.tolaria.data import Dataset
from esper.tolaria.trainer import TrainingDiverged
from esper.urza import BlueprintCatalogue
from tests.integration.scripted import ScriptedController
from tests.tolaria.support import RUN_ID, SECRET, ScriptedChannel, assert_same_host, events, make_trainer

torch.set_num_threads(1)


def test_nan_weights_roll_back_to_the_last_checkpoint_and_are_reported(
    tmp_path: Path, dataset: Dataset, catalogue: BlueprintCatalogue
) -> None:
    trainer = make_trainer(tmp_path / "run", dataset, catalogue)
    trainer.save_checkpoint()
    for _ in range(6):
        trainer.train_step()
    trainer.save_checkpoint()
    good = {k: v.clone() for k, v in trainer.host.state_dict().items()}
    lr = trainer.optimizer.lr
    with torch.no_grad():
        trainer.host.head.weight.fill_(math.nan)
    trainer.train_step()
    assert trainer.rollbacks == 1 and trainer.step == 6
    for name, tensor in trainer.host.state_dict().items():
        assert torch.equal(tensor, good[name]), name
    assert trainer.optimizer.lr == pytest.approx(lr * trainer.settings.rollback_lr_factor)
    (event,) = events(trainer, "rollback")
    assert "nan" in event["reason"] and event["detail"]["restored_step"] == 6
    trainer.train_step()
    assert trainer.step == 7 and trainer.rollbacks == 1


def test_a_rollback_tells_the_controller_which_step_the_run_went_back_to(
    tmp_path: Path, dataset: Dataset, catalogue: BlueprintCatalogue
) -> None:
    trainer = make_trainer(tmp_path / "run", dataset, catalogue)
    rewinds: list[tuple[str, int]] = []
    trainer.controller.rewound = lambda run, step: rewinds.append((run, step))  # type: ignore[method-assign]
    trainer.save_checkpoint()
    for _ in range(6):
        trainer.train_step()
    trainer.save_checkpoint()
    for _ in range(3):
        trainer.train_step()
    with torch.no_grad():
        trainer.host.head.weight.fill_(math.nan)
    trainer.train_step()
    assert rewinds == [(RUN_ID, 6)]


def test_a_loss_spike_rolls_back(tmp_path: Path, dataset: Dataset, catalogue: BlueprintCatalogue) -> None:
    trainer = make_trainer(tmp_path / "run", dataset, catalogue, spike_warmup_steps=2)
    trainer.save_checkpoint()
    for _ in range(4):
        trainer.train_step()
    with torch.no_grad():
        trainer.host.head.weight.mul_(1e3)
    trainer.train_step()
    (event,) = events(trainer, "rollback")
    assert "spiked" in event["reason"] and trainer.step == 0


def test_repeated_explosions_diverge_and_broadcast_a_halt(
    tmp_path: Path, dataset: Dataset, catalogue: BlueprintCatalogue
) -> None:
    channel = ScriptedChannel()
    trainer = make_trainer(tmp_path / "run", dataset, catalogue, channel=channel, max_rollbacks=1)
    trainer.save_checkpoint()
    with torch.no_grad():
        trainer.host.head.weight.fill_(math.inf)
    trainer.train_step()
    assert trainer.rollbacks == 1
    with torch.no_grad():
        trainer.host.head.weight.fill_(math.inf)
    with pytest.raises(TrainingDiverged, match="after 1 rollback"):
        trainer.train_step()
    assert len(channel.broadcasts) == 1 and RUN_ID in channel.broadcasts[0]
    (event,) = events(trainer, "emergency_broadcast")
    assert event["detail"]["signal_id"] == "sig-1" and "diverged" in event["reason"]


def test_a_run_told_not_to_halt_others_diverges_alone(
    tmp_path: Path, dataset: Dataset, catalogue: BlueprintCatalogue
) -> None:
    channel = ScriptedChannel()
    trainer = make_trainer(
        tmp_path / "run", dataset, catalogue, channel=channel, max_rollbacks=0, halt_on_divergence=False
    )
    trainer.save_checkpoint()
    with torch.no_grad():
        trainer.host.head.weight.fill_(math.inf)
    with pytest.raises(TrainingDiverged):
        trainer.train_step()
    assert channel.broadcasts == [] and events(trainer, "emergency_broadcast") == []


def test_a_halt_checkpoints_logs_and_stops_then_resume_equals_an_uninterrupted_run(
    tmp_path: Path, dataset: Dataset, catalogue: BlueprintCatalogue
) -> None:
    reference = make_trainer(tmp_path / "reference", dataset, catalogue)
    expected = reference.fit()
    assert not expected.halted

    channel = ScriptedChannel(halt_at_poll=15)
    halted = make_trainer(tmp_path / "halted", dataset, catalogue, channel=channel)
    outcome = halted.fit()
    assert outcome.halted and outcome.halt is not None and outcome.halt.reason == "operator pressed stop"
    assert outcome.steps == 14 < expected.steps
    assert halted.store.steps()[-1] == 14, "the halt left no checkpoint at the step it stopped"
    (event,) = events(halted, "emergency_halt")
    assert event["step"] == 14 and event["detail"]["origin"] == "test"
    assert halted.manager.live_seed_ids(), "a halt must not terminate the seeds"

    resumed = make_trainer(tmp_path / "halted", dataset, catalogue)
    assert resumed.resume() and resumed.step == 14
    final = resumed.fit()
    assert not final.halted
    assert final.evaluation == expected.evaluation and final.parameters == expected.parameters
    assert_same_host(resumed, reference)
    # The halt event survives the resume: the checkpoint was written after it.
    assert [e["step"] for e in events(resumed, "emergency_halt")] == [14]


def test_an_unreadable_channel_is_reported_once_and_training_goes_on(
    tmp_path: Path, dataset: Dataset, catalogue: BlueprintCatalogue
) -> None:
    channel = ScriptedChannel(trouble_polls=(3, 4, 5))
    trainer = make_trainer(tmp_path / "run", dataset, catalogue, channel=channel, epochs=1)
    outcome = trainer.fit()
    assert not outcome.halted and outcome.steps == trainer.total_steps
    assert [e["step"] for e in events(trainer, "emergency_channel_unavailable")] == [2]
    assert [e["step"] for e in events(trainer, "emergency_channel_recovered")] == [5]


@pytest.mark.parametrize(("anticipation_steps", "lead"), [(2, 2), (0, 0), (10, 3)])
def test_the_controller_hears_of_each_decision_the_configured_steps_ahead(
    tmp_path: Path, dataset: Dataset, catalogue: BlueprintCatalogue, anticipation_steps: int, lead: int
) -> None:
    """`TOLARIA_ANTICIPATION_STEPS` before each decision (at most `decision_interval - 1`; 0: never) the
    trainer calls `controller.anticipate()`, a hint that changes nothing else."""
    trainer = make_trainer(tmp_path / "run", dataset, catalogue, anticipation_steps=anticipation_steps)
    heard: list[int] = []
    trainer.controller.anticipate = lambda: heard.append(trainer.step)  # type: ignore[method-assign]
    trainer.fit()
    interval = trainer.settings.decision_interval
    decided_at = [step for step in range(1, trainer.total_steps + 1) if step % interval == 0]
    assert len(decided_at) == trainer.decisions > 0
    assert heard == ([step - lead for step in decided_at] if lead else [])


class _Durability(ScriptedController):
    """The scripted controller, noting each `checkpointed` call with the checkpoints on disk then."""

    def __init__(self, trainer_dir: Path) -> None:
        super().__init__(SECRET, germinate=("h1",), blueprints={"h1": "mlp_small"})
        self.directory = trainer_dir
        self.calls: list[tuple[str, int, bool]] = []

    def checkpointed(self, training_run_id: str, step: int) -> None:
        on_disk = (self.directory / f"ckpt-{step:09d}.json").exists()
        self.calls.append((training_run_id, step, on_disk))

    def rewound(self, training_run_id: str, step: int) -> None:
        """Nothing recorded to abandon."""


def test_the_controller_hears_of_each_checkpoint_once_it_is_durable_halt_included(
    tmp_path: Path, dataset: Dataset, catalogue: BlueprintCatalogue
) -> None:
    trainer = make_trainer(
        tmp_path / "run",
        dataset,
        catalogue,
        channel=ScriptedChannel(halt_at_poll=15),
        checkpoint_every_epochs=1,
    )
    listener = _Durability(trainer.store.directory)
    trainer.controller = listener
    outcome = trainer.fit()
    assert outcome.halted and outcome.steps == 14
    epoch = trainer.steps_per_epoch
    (germinated,) = [e["step"] for e in events(trainer, "transition") if e["to_stage"] == "GERMINATED"]
    assert germinated < epoch < 14
    assert listener.calls == [
        (RUN_ID, 0, True),
        (RUN_ID, germinated, True),  # a structural change is checkpointed at once
        (RUN_ID, epoch, True),
        (RUN_ID, 14, True),
    ]


def test_every_training_forward_runs_in_training_mode_through_germination_and_evaluation(
    tmp_path: Path, dataset: Dataset, catalogue: BlueprintCatalogue
) -> None:
    """The host is put in training mode after whatever may have changed its modules (a command, new
    parameters, a restore), not on every step; each training forward still sees every module training."""
    trainer = make_trainer(tmp_path / "run", dataset, catalogue, epochs=4)
    host, manager = trainer.host, trainer.manager
    apply = manager.apply
    left_in_eval: list[str] = []

    def apply_and_leave_new_modules_in_eval(command: Any, *, step: int) -> Any:
        result = apply(command, step=step)
        for slot in host.slots():
            if slot.seed is not None and manager.seed_id(slot.slot_id) not in left_in_eval:
                slot.seed.eval()  # a new seed, as a blueprint builder might leave it
                left_in_eval.append(manager.seed_id(slot.slot_id))
        return result

    manager.apply = apply_and_leave_new_modules_in_eval  # type: ignore[method-assign]
    train = host.train
    mode_sets: list[int] = []

    def counted_train(mode: bool = True) -> torch.nn.Module:
        mode_sets.append(trainer.step)
        return train(mode)

    host.train = counted_train  # type: ignore[method-assign]
    training_forwards: list[bool] = []

    def check(module: torch.nn.Module, args: Any) -> None:
        if torch.is_grad_enabled():
            training_forwards.append(all(m.training for m in host.modules()))

    host.register_forward_pre_hook(check)
    trainer.fit()
    assert left_in_eval  # a seed germinated
    assert len(training_forwards) == trainer.total_steps and all(training_forwards)
    assert len(mode_sets) < trainer.total_steps  # not once per step
