"""CommandFactory.growth: signed WIDEN/DEEPEN commands that name only layers the packet has."""

from __future__ import annotations

import pytest

from esper.leyline import ManualClock, SignatureVerifier, pb, validate_command
from esper.tamiyo.model.proposal import Proposal
from esper.tamiyo.runtime.commands import CommandBuildError, CommandFactory

SECRET = b"tamiyo-growth-secret-0123456789"


def _packet() -> pb.SystemStatePacket:
    packet = pb.SystemStatePacket(packet_id="p", training_run_id="run", source_subsystem="tolaria")
    packet.topology.layers.add(layer_id="fc1", kind="linear", width=8)
    packet.topology.slots.add(slot_id="h1", layer_id="fc1", width=8, kind="mlp")
    packet.seed_states.add(seed_id="h1", slot_id="h1", stage=pb.SEED_STAGE_DORMANT)
    return packet


def test_a_widen_command_is_signed_valid_and_targets_its_layer() -> None:
    clock = ManualClock()
    factory = CommandFactory(SECRET, clock)
    command = factory.growth(_packet(), pb.SEED_OP_WIDEN, "fc1", units=4, reason="bottleneck")
    validate_command(command)
    SignatureVerifier(SECRET, clock=clock).verify(command)
    growth = command.seed_operation.growth
    assert command.target_seed_id == "fc1" and command.seed_operation.operation == pb.SEED_OP_WIDEN
    assert (growth.layer_id, growth.units, growth.init) == ("fc1", 4, pb.GROWTH_INIT_GRADMAX)
    deepen = factory.growth(_packet(), pb.SEED_OP_DEEPEN, "fc1", hidden=6)
    assert deepen.seed_operation.growth.hidden == 6


@pytest.mark.parametrize(
    ("operation", "layer_id", "units"),
    [(pb.SEED_OP_WIDEN, "fc9", 4), (pb.SEED_OP_WIDEN, "fc1", 0), (pb.SEED_OP_CULL, "fc1", 4)],
)
def test_a_growth_naming_what_the_packet_lacks_is_refused(operation: int, layer_id: str, units: int) -> None:
    with pytest.raises(CommandBuildError):
        CommandFactory(SECRET, ManualClock()).growth(_packet(), operation, layer_id, units=units)


def test_a_growth_is_fossilised_by_its_id_from_the_packet() -> None:
    packet = _packet()
    packet.growth_states.add(
        seed_id="fc1:w1", slot_id="fc1:w1", stage=pb.SEED_STAGE_PROBATIONARY, blueprint_id="widen"
    )
    proposal = Proposal(action=pb.POLICY_ACTION_FOSSILIZE, slot_id="fc1:w1")
    command = CommandFactory(SECRET, ManualClock()).build(proposal, packet)
    assert command.target_seed_id == "fc1:w1" and command.seed_operation.slot_id == "fc1:w1"
