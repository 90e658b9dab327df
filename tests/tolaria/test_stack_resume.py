"""Trainer with stacking: a slot hosts seed after seed, and kill and resume equal an uninterrupted run."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from esper.leyline import pb
from esper.tolaria.data import Dataset
from esper.tolaria.growth_steps import growth_steps
from esper.tolaria.trainer import Trainer
from esper.urza import BlueprintCatalogue
from tests.integration.scripted import DecidesAtOnce
from tests.tolaria.support import (
    GROWTH_KASMINA,
    SECRET,
    ScriptedChannel,
    assert_same_run,
    make_trainer,
)

torch.set_num_threads(1)
BLUEPRINTS = ("lowrank", "mlp_small", "mlp_expand")  # folded, then kept, then kept
# The growth lifecycle's settings, with Kasmina's own statistics window (nothing grows here).
STACK_KASMINA = {k: v for k, v in GROWTH_KASMINA.items() if k != "growth_statistics_steps"}


class StackController(DecidesAtOnce):
    """Germinates the next blueprint in slot h1 whenever it is dormant, fossilises it when ready."""

    issuer = "stack-test"

    def __init__(self) -> None:
        super().__init__(SECRET)
        self.germinated = 0

    def evaluate_step(self, packet: pb.SystemStatePacket) -> pb.AdaptationCommand:
        self.decisions += 1
        command = self.wait(packet)
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
        return self.signed(command)

    def export_state(self) -> dict[str, Any]:
        return super().export_state() | {"germinated": self.germinated}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        super().restore_state(state)
        self.germinated = int(state["germinated"])


def stack_trainer(
    run_dir: Path, dataset: Dataset, catalogue: BlueprintCatalogue, channel: ScriptedChannel | None = None
) -> Trainer:
    return make_trainer(
        run_dir,
        dataset,
        catalogue,
        controller=StackController(),
        channel=channel,
        kasmina=STACK_KASMINA,
        epochs=12,
        decision_interval=2,
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
    reference = stack_trainer(tmp_path / "reference", dataset, catalogue)
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
        halted = stack_trainer(run, dataset, catalogue, ScriptedChannel(halt_at_poll=halt))
        assert halted.fit().halted
        resumed = stack_trainer(run, dataset, catalogue)
        assert resumed.resume()
        assert_same_run(resumed, resumed.fit(), reference, expected)
        assert _stacked(resumed) == stacked
        # The summary's growth steps come from what the trainer gathered, across the kill: they equal
        # those read back from the run's records, and the uninterrupted run's.
        from_records = growth_steps(resumed.run_dir.events.read(), resumed.run_dir.metrics.read())
        assert resumed.growth_log.steps() == from_records == reference.growth_log.steps()
        assert len(from_records) == 3
