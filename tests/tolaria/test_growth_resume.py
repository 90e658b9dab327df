"""Trainer with WIDEN and DEEPEN: kill and resume after a growth equals an uninterrupted run."""

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
from esper.tamiyo.runtime.commands import CommandFactory
from esper.tolaria.data import Dataset, make_task
from esper.tolaria.hosts import build_host
from esper.tolaria.settings import TolariaSettings
from esper.tolaria.trainer import Trainer
from esper.urza import BlueprintCatalogue
from tests.tolaria.test_trainer import ScriptedChannel

torch.set_num_threads(1)
SECRET = b"tolaria-growth-secret-0123456789"
RUN_ID = "run-growth-test"


class GrowthController:
    """Starts one growth at the second decision, fossilises it when ready, waits otherwise."""

    def __init__(self, operation: int) -> None:
        self.operation = operation
        self.factory = CommandFactory(SECRET, SYSTEM_CLOCK, issuer="growth-test")
        self.decisions = 0

    def prepare(self, packet: pb.SystemStatePacket) -> None:
        """Nothing to warm up."""

    def anticipate(self) -> None:
        """Nothing to warm up."""

    def submit(self, packet: pb.SystemStatePacket) -> None:
        """Decides at once; `collect` hands the command back."""
        self.submitted: pb.AdaptationCommand | None = self.evaluate_step(packet)

    def collect(self) -> pb.AdaptationCommand:
        command, self.submitted = self.submitted, None
        assert command is not None, "collect without submit"
        return command

    def evaluate_step(self, packet: pb.SystemStatePacket) -> pb.AdaptationCommand:
        self.decisions += 1
        if self.decisions == 2:
            return self.factory.growth(packet, self.operation, "fc1", units=4, alpha_ramp_steps=4)
        command = pb.AdaptationCommand(
            version=1,
            command_id=f"growth-{packet.training_run_id}-{self.decisions}",
            issued_by="growth-test",
            training_run_id=packet.training_run_id,
            command_type=pb.COMMAND_WAIT,
        )
        for state in packet.growth_states:
            if state.metrics.get("fossilize_ready") == 1.0:
                command.command_type = pb.COMMAND_SEED
                command.target_seed_id = state.seed_id
                command.seed_operation.operation = pb.SEED_OP_FOSSILIZE
                command.seed_operation.slot_id = state.slot_id
        command.issued_at.FromNanoseconds(SYSTEM_CLOCK.wall_ns())
        return sign(command, SECRET)

    def export_state(self) -> dict[str, Any]:
        return {"decisions": self.decisions}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        self.decisions = int(state["decisions"])

    def checkpointed(self, training_run_id: str, step: int) -> None:
        pass  # nothing recorded to release

    def rewound(self, training_run_id: str, step: int) -> None:
        """Nothing recorded to abandon."""


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return make_task(0.3, 0, n_features=8, n_classes=3, n_samples=320)


@pytest.fixture
def catalogue(tmp_path: Path) -> Iterator[BlueprintCatalogue]:
    catalogue = BlueprintCatalogue.open_default(tmp_path / "urza.sqlite3")
    yield catalogue
    catalogue.close()


def make_trainer(
    run_dir: Path,
    dataset: Dataset,
    catalogue: BlueprintCatalogue,
    operation: int,
    channel: ScriptedChannel | None = None,
) -> Trainer:
    settings = load_settings(
        TolariaSettings, environ={}, epochs=8, batch_size=32, decision_interval=3, seed=1
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
        growth_statistics_steps=2,
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
        controller=GrowthController(operation),
        blueprint_ids=catalogue.ids_for("mlp"),
        run_dir=run_directory(RunLayout(run_dir)),
        training_run_id=RUN_ID,
        emergency=channel,
    )


def _transitions(trainer: Trainer) -> list[tuple[int, str, str]]:
    return [
        (e["step"], e["slot_id"], e["to_stage"])
        for e in trainer.run_dir.events.read()
        if e["kind"] == "transition" and ":" in e["slot_id"] and e["slot_id"][0] == "f"
    ]


@pytest.mark.parametrize(
    ("operation", "growth_id", "halts"),
    [
        # Germinated at step 6: halted while gathering gradmax statistics, and after the merge.
        (pb.SEED_OP_WIDEN, "fc1:w1", (8, 24)),
        # Halted while blending, and after fossilisation.
        (pb.SEED_OP_DEEPEN, "fc1:d1", (12, 24)),
    ],
)
def test_kill_and_resume_after_a_growth_equals_an_uninterrupted_run(
    tmp_path: Path,
    dataset: Dataset,
    catalogue: BlueprintCatalogue,
    operation: int,
    *,
    growth_id: str,
    halts: tuple[int, ...],
) -> None:
    reference = make_trainer(tmp_path / "reference", dataset, catalogue, operation)
    expected = reference.fit()
    stages = [stage for _, slot, stage in _transitions(reference) if slot == growth_id]
    assert stages[:1] == ["GERMINATED"] and "FOSSILIZED" in stages, stages
    grown = [layer.width for layer in reference.host.topology().layers]
    assert grown[0] == (8 if operation == pb.SEED_OP_WIDEN else 4)  # the narrow start, 4 units
    for halt in halts:
        run = tmp_path / f"halted-{halt}"
        halted = make_trainer(run, dataset, catalogue, operation, ScriptedChannel(halt_at_poll=halt))
        assert halted.fit().halted
        resumed = make_trainer(run, dataset, catalogue, operation)
        assert resumed.resume() and resumed.step == halt - 1
        final = resumed.fit()
        assert final.evaluation == expected.evaluation and final.parameters == expected.parameters
        reference_state = reference.host.state_dict()
        resumed_state = resumed.host.state_dict()
        assert resumed_state.keys() == reference_state.keys()
        for name, tensor in resumed_state.items():
            assert torch.equal(tensor, reference_state[name]), name
        assert _transitions(resumed) == _transitions(reference)


@pytest.mark.parametrize("operation", [pb.SEED_OP_WIDEN, pb.SEED_OP_DEEPEN])
def test_every_packet_carries_the_hosts_topology_of_its_step_through_a_growth(
    tmp_path: Path, dataset: Dataset, catalogue: BlueprintCatalogue, operation: int
) -> None:
    trainer = make_trainer(tmp_path / "run", dataset, catalogue, operation)
    host_topology = trainer.host.topology
    built: list[int] = []

    def counted() -> pb.HostTopology:
        built.append(trainer.step)
        return host_topology()

    trainer.host.topology = counted  # type: ignore[method-assign]
    seen: list[tuple[bytes, bytes]] = []
    controller = trainer.controller
    assert isinstance(controller, GrowthController)
    submit = controller.submit

    def checked(packet: pb.SystemStatePacket) -> None:
        now = host_topology().SerializeToString(deterministic=True)
        seen.append((packet.topology.SerializeToString(deterministic=True), now))
        submit(packet)

    controller.submit = checked  # type: ignore[method-assign]
    trainer.fit()
    assert all(packet == host for packet, host in seen)
    if operation == pb.SEED_OP_WIDEN:
        assert len({host for _, host in seen}) == 2  # the merge widened fc1
    # Built again only after something changed the host, not twice on every decision.
    assert 0 < len(built) < len(seen)
