"""Helpers for Tolaria's trainer tests: one trainer builder, scripted controllers and channel, and the
checks that a resumed run equals the uninterrupted one."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from esper.assembly import run_directory
from esper.kasmina import KasminaSettings, SeedManager
from esper.leyline import SYSTEM_CLOCK, Clock, SignatureVerifier, load_settings, pb
from esper.nissa.layout import RunLayout
from esper.tamiyo.runtime.commands import CommandFactory
from esper.tolaria.controller import Controller
from esper.tolaria.data import Dataset
from esper.tolaria.emergency import ChannelTrouble, HaltRequest
from esper.tolaria.hosts import build_host
from esper.tolaria.settings import TolariaSettings
from esper.tolaria.trainer import Trainer, TrainingOutcome
from esper.urza import BlueprintCatalogue
from tests.integration.scripted import DecidesAtOnce, ScriptedController

SECRET = b"tolaria-test-secret-0123456789"
RUN_ID = "run-trainer-test"

# Seeds that settle within a few steps: the scripted controller's germination reaches probation in a run
# of two short epochs.
SEED_KASMINA: Mapping[str, float] = {"min_training_steps": 4, "improvement_window": 1, "probation_steps": 4}
# Seeds and growths that go from germination to fossilised within a few decisions, whatever they do to
# the loss.
GROWTH_KASMINA: Mapping[str, float] = {
    "min_training_steps": 3,
    "improvement_window": 1,
    "min_shadowing_steps": 1,
    "probation_steps": 2,
    "growth_statistics_steps": 2,
    "min_contribution_loss": -1.0,
    "contribution_accuracy_tolerance": 1.0,
}


def scripted_controller() -> ScriptedController:
    """Germinates slot h1 with `mlp_small` once, fossilises it when ready."""
    return ScriptedController(SECRET, germinate=("h1",), blueprints={"h1": "mlp_small"})


def make_trainer(
    run_dir: Path,
    dataset: Dataset,
    catalogue: BlueprintCatalogue,
    *,
    controller: Controller | None = None,
    channel: ScriptedChannel | None = None,
    clock: Clock = SYSTEM_CLOCK,
    kasmina: Mapping[str, float] = SEED_KASMINA,
    host_device: str | None = None,
    **overrides: Any,
) -> Trainer:
    """A trainer of an MLP host on `dataset` (two epochs of 32-example batches, a decision every 4
    steps, seed 1, unless `overrides` says otherwise); `controller`: the scripted one by default;
    `kasmina`: the seed lifecycle's settings; `host_device`: where the host is put before the trainer
    sees it."""
    defaults = {"epochs": 2, "batch_size": 32, "decision_interval": 4, "seed": 1}
    settings = load_settings(TolariaSettings, environ={}, **(defaults | overrides))
    torch.manual_seed(settings.seed)
    host = build_host("mlp", dataset.input_shape, dataset.num_classes)
    if host_device is not None:
        host = host.to(host_device)
    manager = SeedManager(
        host.slots(),
        catalogue,
        SignatureVerifier(SECRET),
        load_settings(KasminaSettings, environ={}, **kasmina),
        training_run_id=RUN_ID,
        host=host,
    )
    return Trainer(
        settings=settings,
        dataset=dataset,
        host=host,
        manager=manager,
        controller=scripted_controller() if controller is None else controller,
        blueprint_ids=catalogue.ids_for("mlp"),
        run_dir=run_directory(RunLayout(run_dir)),
        training_run_id=RUN_ID,
        emergency=channel,
        clock=clock,
    )


def growth_trainer(
    run_dir: Path,
    dataset: Dataset,
    catalogue: BlueprintCatalogue,
    operation: int = pb.SEED_OP_WIDEN,
    **overrides: Any,
) -> Trainer:
    """A run that grows fc1 once with `operation` (WIDEN or DEEPEN) and fossilises it: eight epochs, a
    decision every 3 steps, unless `overrides` (passed on to `make_trainer`) says otherwise."""
    options: dict[str, Any] = {"epochs": 8, "decision_interval": 3} | overrides
    return make_trainer(
        run_dir, dataset, catalogue, controller=GrowthController(operation), kasmina=GROWTH_KASMINA, **options
    )


class ScriptedChannel:
    """An emergency channel whose polls return what the test queued, step by step."""

    def __init__(self, halt_at_poll: int | None = None, trouble_polls: tuple[int, ...] = ()) -> None:
        self.halt_at_poll = halt_at_poll
        self.trouble_polls = trouble_polls
        self.polls = 0
        self.broadcasts: list[str] = []

    def poll_halt(self) -> HaltRequest | ChannelTrouble | None:
        self.polls += 1
        if self.polls in self.trouble_polls:
            return ChannelTrouble(reason="bus down (scripted)")
        if self.polls == self.halt_at_poll:
            return HaltRequest(reason="operator pressed stop", origin="test", signal_id="sig-1")
        return None

    def broadcast_halt(self, reason: str) -> str:
        self.broadcasts.append(reason)
        return f"sig-{len(self.broadcasts)}"


class GrowthController(DecidesAtOnce):
    """Starts one growth of fc1 at the second decision, fossilises it when ready, waits otherwise."""

    issuer = "growth-test"

    def __init__(self, operation: int) -> None:
        super().__init__(SECRET)
        self.operation = operation
        self.factory = CommandFactory(SECRET, SYSTEM_CLOCK, issuer=self.issuer)

    def evaluate_step(self, packet: pb.SystemStatePacket) -> pb.AdaptationCommand:
        self.decisions += 1
        if self.decisions == 2:
            return self.factory.growth(packet, self.operation, "fc1", units=4, alpha_ramp_steps=4)
        command = self.wait(packet)
        for state in packet.growth_states:
            if state.metrics.get("fossilize_ready") == 1.0:
                command.command_type = pb.COMMAND_SEED
                command.target_seed_id = state.seed_id
                command.seed_operation.operation = pb.SEED_OP_FOSSILIZE
                command.seed_operation.slot_id = state.slot_id
        return self.signed(command)


def events(trainer: Trainer, kind: str) -> list[dict[str, Any]]:
    """The run's events of `kind`, in order."""
    return [e for e in trainer.run_dir.events.read() if e["kind"] == kind]


def assert_same_host(resumed: Trainer, reference: Trainer) -> None:
    """Both hosts hold the same tensors under the same names."""
    reference_state = reference.host.state_dict()
    resumed_state = resumed.host.state_dict()
    assert resumed_state.keys() == reference_state.keys()
    for name, tensor in resumed_state.items():
        assert torch.equal(tensor, reference_state[name]), name


def assert_same_run(
    resumed: Trainer, outcome: TrainingOutcome, reference: Trainer, expected: TrainingOutcome
) -> None:
    """The resumed run ended as the uninterrupted one: same evaluation, parameter count and host."""
    assert outcome.evaluation == expected.evaluation and outcome.parameters == expected.parameters
    assert_same_host(resumed, reference)
