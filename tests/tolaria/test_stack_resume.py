"""Trainer with stacking: a slot hosts seed after seed, and kill and resume equal an uninterrupted run."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from esper.assembly import run_directory
from esper.kasmina import KasminaSettings, SeedManager
from esper.leyline import SYSTEM_CLOCK, SignatureVerifier, load_settings, pb, sign
from esper.nissa.layout import RunLayout
from esper.tolaria.data import Dataset, make_task
from esper.tolaria.growth_steps import growth_steps
from esper.tolaria.hosts import build_host
from esper.tolaria.settings import TolariaSettings
from esper.tolaria.trainer import Trainer
from esper.urza import BlueprintCatalogue
from tests.tolaria.test_growth_resume import RUN_ID, SECRET
from tests.tolaria.test_trainer import ScriptedChannel

torch.set_num_threads(1)
BLUEPRINTS = ("lowrank", "mlp_small", "mlp_expand")  # folded, then kept, then kept


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return make_task(0.3, 0, n_features=8, n_classes=3, n_samples=320)


@pytest.fixture
def catalogue(tmp_path: Path) -> Iterator[BlueprintCatalogue]:
    catalogue = BlueprintCatalogue.open_default(tmp_path / "urza.sqlite3")
    yield catalogue
    catalogue.close()


class StackController:
    """Germinates the next blueprint in slot h1 whenever it is dormant, fossilises it when ready."""

    def __init__(self) -> None:
        self.decisions = 0
        self.germinated = 0

    def prepare(self, packet: pb.SystemStatePacket) -> None:
        """Nothing to warm up."""

    def anticipate(self) -> None:
        """Nothing to warm up."""

    def submit(self, packet: pb.SystemStatePacket) -> None:
        self.submitted: pb.AdaptationCommand | None = self.evaluate_step(packet)

    def collect(self) -> pb.AdaptationCommand:
        command, self.submitted = self.submitted, None
        assert command is not None, "collect without submit"
        return command

    def evaluate_step(self, packet: pb.SystemStatePacket) -> pb.AdaptationCommand:
        self.decisions += 1
        command = pb.AdaptationCommand(
            version=1,
            command_id=f"stack-{packet.training_run_id}-{self.decisions}",
            issued_by="stack-test",
            training_run_id=packet.training_run_id,
            command_type=pb.COMMAND_WAIT,
        )
        state = next(s for s in packet.seed_states if s.slot_id == "h1")
        operation = command.seed_operation
        if state.stage == pb.SEED_STAGE_DORMANT and self.germinated < len(BLUEPRINTS):
            operation.operation = pb.SEED_OP_GERMINATE
            operation.blueprint_id = BLUEPRINTS[self.germinated]
            operation.alpha_ramp_steps = 3
            self.germinated += 1
        elif state.metrics.get("fossilize_ready") == 1.0:
            operation.operation = pb.SEED_OP_FOSSILIZE
        else:
            command.command_id += "-wait"
        if command.HasField("seed_operation"):
            command.command_type = pb.COMMAND_SEED
            command.target_seed_id = state.seed_id
            operation.slot_id = "h1"
        command.issued_at.FromNanoseconds(SYSTEM_CLOCK.wall_ns())
        return sign(command, SECRET)

    def export_state(self) -> dict[str, Any]:
        return {"decisions": self.decisions, "germinated": self.germinated}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        self.decisions = int(state["decisions"])
        self.germinated = int(state["germinated"])

    def checkpointed(self, training_run_id: str, step: int) -> None:
        """Nothing recorded to release."""

    def rewound(self, training_run_id: str, step: int) -> None:
        """Nothing recorded to abandon."""


def make_trainer(
    run_dir: Path, dataset: Dataset, catalogue: BlueprintCatalogue, channel: ScriptedChannel | None = None
) -> Trainer:
    settings = load_settings(
        TolariaSettings, environ={}, epochs=12, batch_size=32, decision_interval=2, seed=1
    )
    torch.manual_seed(settings.seed)
    host = build_host("mlp", dataset.input_shape, dataset.num_classes)
    kasmina = load_settings(
        KasminaSettings,
        environ={},
        min_training_steps=3,
        improvement_window=1,
        min_shadowing_steps=1,
        probation_steps=2,
        min_contribution_loss=-1.0,
        contribution_accuracy_tolerance=1.0,
    )
    manager = SeedManager(
        host.slots(), catalogue, SignatureVerifier(SECRET), kasmina, training_run_id=RUN_ID, host=host
    )
    return Trainer(
        settings=settings,
        dataset=dataset,
        host=host,
        manager=manager,
        controller=StackController(),
        blueprint_ids=catalogue.ids_for("mlp"),
        run_dir=run_directory(RunLayout(run_dir)),
        training_run_id=RUN_ID,
        emergency=channel,
    )


def _stacked(trainer: Trainer) -> list[tuple[int, str, bool]]:
    return [
        (e["step"], e["seed_id"], e["detail"]["folded"])
        for e in trainer.run_dir.events.read()
        if e["kind"] == "stacked"
    ]


def test_kill_and_resume_after_stacking_equals_an_uninterrupted_run(
    tmp_path: Path, dataset: Dataset, catalogue: BlueprintCatalogue
) -> None:
    reference = make_trainer(tmp_path / "reference", dataset, catalogue)
    expected = reference.fit()
    stacked = _stacked(reference)
    assert [(seed, folded) for _, seed, folded in stacked] == [
        ("h1:g1", True),
        ("h1:g2", False),
        ("h1:g3", False),
    ], stacked
    assert reference.manager.fossilized_count() == 3
    # Halted after the fold, and after the first kept fossil (its module is rebuilt on resume).
    for halt in (stacked[0][0] + 3, stacked[1][0] + 3):
        run = tmp_path / f"halted-{halt}"
        halted = make_trainer(run, dataset, catalogue, ScriptedChannel(halt_at_poll=halt))
        assert halted.fit().halted
        resumed = make_trainer(run, dataset, catalogue)
        assert resumed.resume()
        final = resumed.fit()
        assert final.evaluation == expected.evaluation and final.parameters == expected.parameters
        reference_state = reference.host.state_dict()
        resumed_state = resumed.host.state_dict()
        assert resumed_state.keys() == reference_state.keys()
        for name, tensor in resumed_state.items():
            assert torch.equal(tensor, reference_state[name]), name
        assert _stacked(resumed) == stacked
        # The summary's growth steps come from what the trainer gathered, across the kill: they equal
        # those read back from the run's records, and the uninterrupted run's.
        from_records = growth_steps(resumed.run_dir.events.read(), resumed.run_dir.metrics.read())
        assert resumed.growth_log.steps() == from_records == reference.growth_log.steps()
        assert len(from_records) == 3
