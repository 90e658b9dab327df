"""Trainer with WIDEN and DEEPEN: kill and resume after a growth equals an uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from esper.leyline import pb
from esper.tolaria.data import Dataset
from esper.tolaria.trainer import Trainer
from esper.urza import BlueprintCatalogue
from tests.tolaria.support import GrowthController, ScriptedChannel, assert_same_run, growth_trainer

torch.set_num_threads(1)


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
    reference = growth_trainer(tmp_path / "reference", dataset, catalogue, operation)
    expected = reference.fit()
    stages = [stage for _, slot, stage in _transitions(reference) if slot == growth_id]
    assert stages[:1] == ["GERMINATED"] and "FOSSILIZED" in stages, stages
    grown = [layer.width for layer in reference.host.topology().layers]
    assert grown[0] == (8 if operation == pb.SEED_OP_WIDEN else 4)  # the narrow start, 4 units
    for halt in halts:
        run = tmp_path / f"halted-{halt}"
        halted = growth_trainer(
            run, dataset, catalogue, operation, channel=ScriptedChannel(halt_at_poll=halt)
        )
        assert halted.fit().halted
        resumed = growth_trainer(run, dataset, catalogue, operation)
        assert resumed.resume() and resumed.step == halt - 1
        assert_same_run(resumed, resumed.fit(), reference, expected)
        assert _transitions(resumed) == _transitions(reference)


@pytest.mark.parametrize("operation", [pb.SEED_OP_WIDEN, pb.SEED_OP_DEEPEN])
def test_every_packet_carries_the_hosts_topology_of_its_step_through_a_growth(
    tmp_path: Path, dataset: Dataset, catalogue: BlueprintCatalogue, operation: int
) -> None:
    trainer = growth_trainer(tmp_path / "run", dataset, catalogue, operation)
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
