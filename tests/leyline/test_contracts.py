"""The Leyline contracts: committed bindings match the schema; validation names what is wrong."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from esper.leyline import (
    ContractViolation,
    MalformedMessage,
    from_short_name,
    parse,
    parse_validated,
    pb,
    serialize,
    short_name,
    timestamp_from_ns,
    validate_command,
    validate_field_report,
    validate_packet,
)

ROOT = Path(__file__).resolve().parents[2]


def test_committed_bindings_match_the_schema(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            str(ROOT / "contracts"),
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            str(ROOT / "contracts" / "leyline.proto"),
        ],
        check=True,
    )
    generated = (tmp_path / "leyline_pb2.py").read_text()
    committed = (ROOT / "src" / "esper" / "leyline" / "leyline_pb2.py").read_text()
    assert generated == committed, "leyline_pb2.py is stale: run `make proto` and commit the result"


def test_wait_is_an_explicit_command_type() -> None:
    assert short_name(pb.CommandType, pb.COMMAND_WAIT) == "WAIT"


def _packet(**overrides: object) -> pb.SystemStatePacket:
    packet = pb.SystemStatePacket(
        packet_id="pkt-1", training_run_id="run-1", source_subsystem="tolaria", validation_loss=0.5
    )
    packet.topology.slots.add(slot_id="slot-0", layer_id="layer-0", width=32, kind="mlp")
    for key, value in overrides.items():
        setattr(packet, key, value)
    return packet


def test_valid_packet_passes() -> None:
    assert validate_packet(_packet()).packet_id == "pkt-1"


@pytest.mark.parametrize("field", ["packet_id", "training_run_id", "source_subsystem"])
def test_packet_missing_a_required_id_names_the_field(field: str) -> None:
    with pytest.raises(ContractViolation) as info:
        validate_packet(_packet(**{field: ""}))
    assert info.value.field == field
    assert field in str(info.value)


def test_packet_with_non_finite_loss_is_rejected() -> None:
    with pytest.raises(ContractViolation, match="validation_loss"):
        validate_packet(_packet(validation_loss=float("nan")))


def test_active_seed_without_blueprint_is_rejected_not_invented() -> None:
    packet = _packet()
    packet.seed_states.add(seed_id="seed-0", slot_id="slot-0", stage=pb.SEED_STAGE_TRAINING)
    with pytest.raises(ContractViolation, match="blueprint_id"):
        validate_packet(packet)


def test_seed_on_unknown_slot_is_rejected() -> None:
    packet = _packet()
    packet.seed_states.add(seed_id="s", slot_id="nowhere", stage=pb.SEED_STAGE_DORMANT)
    with pytest.raises(ContractViolation, match="nowhere"):
        validate_packet(packet)


def test_germinate_without_blueprint_is_rejected() -> None:
    command = pb.AdaptationCommand(
        command_id="c1", command_type=pb.COMMAND_SEED, issued_by="tamiyo", issued_at=timestamp_from_ns(1)
    )
    command.seed_operation.operation = pb.SEED_OP_GERMINATE
    command.seed_operation.slot_id = "slot-0"
    with pytest.raises(ContractViolation, match="blueprint_id"):
        validate_command(command)
    command.seed_operation.blueprint_id = "bp-mlp"
    assert validate_command(command) is command


def test_field_report_without_issued_at_is_rejected() -> None:
    report = pb.FieldReport(
        report_id="r",
        command_id="c",
        training_run_id="run",
        outcome=pb.FIELD_REPORT_OUTCOME_SUCCESS,
        observation_window_epochs=1,
    )
    with pytest.raises(ContractViolation, match="issued_at"):
        validate_field_report(report)


def test_round_trip_and_malformed_bytes() -> None:
    packet = _packet(validation_accuracy=0.25)
    assert parse(pb.SystemStatePacket, serialize(packet)) == packet
    with pytest.raises(MalformedMessage):
        parse(pb.SystemStatePacket, b"\xff\xff\xff\xff")


def test_parse_validated_rejects_a_valid_encoding_of_an_invalid_message() -> None:
    with pytest.raises(ContractViolation):
        parse_validated(pb.SystemStatePacket, serialize(pb.SystemStatePacket()))


def test_enum_names_round_trip_and_unknown_names_list_the_valid_ones() -> None:
    assert from_short_name(pb.SeedLifecycleStage, "fossilized") == pb.SEED_STAGE_FOSSILIZED
    with pytest.raises(ContractViolation, match="DORMANT"):
        from_short_name(pb.SeedLifecycleStage, "sprouting")
