"""Construction, validation and (de)serialisation of Leyline messages.

Validation is explicit per message type: the fields a consumer cannot do without are named here, and a
message that lacks one is rejected with a `ContractViolation` naming the field. Nothing is filled in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp

from esper.leyline import leyline_pb2 as pb
from esper.leyline.errors import ContractViolation, MalformedMessage
from esper.leyline.wire import adopt_original_fields, with_original_fields

M = TypeVar("M", bound=Message)

# Messages above this size are refused before parsing: nothing legitimate comes close.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# A single WIDEN adds at most this many units, a DEEPEN block at most this hidden width.
MAX_GROWTH_UNITS = 4096
GROWTH_OPERATIONS = frozenset({pb.SEED_OP_WIDEN, pb.SEED_OP_DEEPEN})


def serialize(message: Message) -> bytes:
    """Deterministic wire form of `message` (same message, same bytes, within one protobuf version).

    The bytes carry the original schema's fields that mirror Esper's wider ones (`esper.leyline.wire`),
    so a reader of the original schema finds its values; `message` itself is not changed.
    """
    return with_original_fields(message).SerializeToString(deterministic=True)


def parse(message_type: type[M], data: bytes) -> M:
    """Parse `data` as `message_type`; any failure is a `MalformedMessage`.

    Esper fields left unset by a writer of the original schema are filled from their original fields.
    """
    name = message_type.DESCRIPTOR.name
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedMessage(name, f"expected bytes, got {type(data).__name__}")
    if len(data) > MAX_MESSAGE_BYTES:
        raise MalformedMessage(name, f"{len(data)} bytes exceeds the limit of {MAX_MESSAGE_BYTES}")
    message = message_type()
    try:
        message.ParseFromString(bytes(data))
    except DecodeError as exc:
        raise MalformedMessage(name, str(exc) or "undecodable bytes") from exc
    except (ValueError, TypeError, RuntimeError) as exc:
        # The upb backend raises these for some corrupt inputs (bad UTF-8 in a string field, ...).
        raise MalformedMessage(name, f"{type(exc).__name__}: {exc}") from exc
    adopt_original_fields(message)
    return message


def timestamp_from_ns(ns: int) -> Timestamp:
    """A protobuf Timestamp for `ns` nanoseconds since the epoch."""
    stamp = Timestamp()
    stamp.FromNanoseconds(ns)
    return stamp


def _require_text(message: Message, fields: Iterable[str]) -> None:
    for field in fields:
        if not getattr(message, field):
            raise ContractViolation(message.DESCRIPTOR.name, field, "is required and was empty")


def _require_present(message: Message, fields: Iterable[str]) -> None:
    for field in fields:
        if not message.HasField(field):
            raise ContractViolation(message.DESCRIPTOR.name, field, "is required and was not set")


def _require_enum(message: Message, fields: Iterable[str]) -> None:
    for field in fields:
        if getattr(message, field) == 0:
            raise ContractViolation(message.DESCRIPTOR.name, field, "is required and was UNSPECIFIED")


def _require_finite(message: Message, fields: Iterable[str]) -> None:
    for field in fields:
        value = getattr(message, field)
        if not math.isfinite(value):
            raise ContractViolation(message.DESCRIPTOR.name, field, f"must be finite, got {value}")


def validate_seed_state(state: pb.SeedState) -> pb.SeedState:
    """A seed state names its slot and has a known stage; an active seed names its blueprint."""
    _require_text(state, ("seed_id", "slot_id"))
    _require_enum(state, ("stage",))
    active = state.stage not in (pb.SEED_STAGE_DORMANT, pb.SEED_STAGE_RESETTING, pb.SEED_STAGE_EMBARGOED)
    if active and not state.blueprint_id:
        raise ContractViolation("SeedState", "blueprint_id", f"is required for a seed in stage {state.stage}")
    _require_finite(state, ("gradient_norm", "learning_rate", "risk_score"))
    return state


def validate_packet(packet: pb.SystemStatePacket) -> pb.SystemStatePacket:
    """Reject a state packet that a controller could not act on without guessing."""
    _require_text(packet, ("packet_id", "training_run_id", "source_subsystem"))
    _require_finite(packet, ("validation_accuracy", "validation_loss", "training_loss"))
    for state in [*packet.seed_states, *packet.growth_states]:
        validate_seed_state(state)
    slot_ids = {slot.slot_id for slot in packet.topology.slots}
    for slot in packet.topology.slots:
        if not slot.slot_id:
            raise ContractViolation("SlotDescriptor", "slot_id", "is required and was empty")
        if slot.width == 0:
            raise ContractViolation("SlotDescriptor", "width", f"slot {slot.slot_id!r} has width 0")
    for state in packet.seed_states:
        if slot_ids and state.slot_id not in slot_ids:
            raise ContractViolation(
                "SeedState", "slot_id", f"{state.slot_id!r} is not a slot of the packet's topology"
            )
    for blueprint_id in packet.blueprint_ids:
        if not blueprint_id:
            raise ContractViolation("SystemStatePacket", "blueprint_ids", "contains an empty id")
    return packet


def validate_command(command: pb.AdaptationCommand) -> pb.AdaptationCommand:
    """A command carries its id, type, issuer and issue time; a seed command names real targets."""
    _require_text(command, ("command_id", "issued_by"))
    _require_enum(command, ("command_type",))
    _require_present(command, ("issued_at",))
    if command.command_type == pb.COMMAND_SEED:
        if not command.HasField("seed_operation"):
            raise ContractViolation("AdaptationCommand", "seed_operation", "is required for COMMAND_SEED")
        operation = command.seed_operation
        _require_enum(operation, ("operation",))
        if operation.operation in GROWTH_OPERATIONS:
            _validate_growth(operation)
        else:
            _require_text(operation, ("slot_id",))
        if operation.operation == pb.SEED_OP_GERMINATE:
            _require_text(operation, ("blueprint_id",))
    if command.command_type == pb.COMMAND_OPTIMIZER and not command.HasField("optimizer_adjustment"):
        raise ContractViolation(
            "AdaptationCommand", "optimizer_adjustment", "is required for COMMAND_OPTIMIZER"
        )
    return command


def _validate_growth(operation: pb.CommandSeedOperation) -> None:
    """A WIDEN names a layer, 1..MAX_GROWTH_UNITS units and an init; a DEEPEN names a layer."""
    if not operation.HasField("growth"):
        raise ContractViolation("CommandSeedOperation", "growth", "is required for WIDEN and DEEPEN")
    growth = operation.growth
    _require_text(growth, ("layer_id",))
    if operation.operation == pb.SEED_OP_WIDEN:
        if not 1 <= growth.units <= MAX_GROWTH_UNITS:
            raise ContractViolation(
                "GrowthSpec", "units", f"must be in 1..{MAX_GROWTH_UNITS} for WIDEN, got {growth.units}"
            )
        _require_enum(growth, ("init",))
    elif growth.hidden > MAX_GROWTH_UNITS:
        raise ContractViolation(
            "GrowthSpec", "hidden", f"must be at most {MAX_GROWTH_UNITS}, got {growth.hidden}"
        )


def validate_field_report(report: pb.FieldReport) -> pb.FieldReport:
    """A field report is tied to its command and run, has an outcome and an issue time. Its window is at
    least one epoch, except for an ABORTED report, which says how many were observed (possibly none)."""
    _require_text(report, ("report_id", "command_id", "training_run_id"))
    _require_enum(report, ("outcome",))
    _require_present(report, ("issued_at",))
    if report.observation_window_epochs == 0 and report.outcome != pb.FIELD_REPORT_OUTCOME_ABORTED:
        raise ContractViolation(
            "FieldReport", "observation_window_epochs", "must be >= 1 (0 only when ABORTED)"
        )
    return report


def validate_policy_update(update: pb.PolicyUpdate) -> pb.PolicyUpdate:
    """A policy update names its version, lineage and payload hash, and carries a payload."""
    _require_text(update, ("policy_id", "tamiyo_policy_version", "architecture_version", "payload_sha256"))
    _require_present(update, ("issued_at",))
    if not update.payload:
        raise ContractViolation("PolicyUpdate", "payload", "is required and was empty")
    if update.sequence == 0:
        raise ContractViolation("PolicyUpdate", "sequence", "must be >= 1")
    return update


VALIDATORS: dict[type[Message], Callable[[Any], Message]] = {
    pb.SystemStatePacket: validate_packet,
    pb.SeedState: validate_seed_state,
    pb.AdaptationCommand: validate_command,
    pb.FieldReport: validate_field_report,
    pb.PolicyUpdate: validate_policy_update,
}


def parse_validated(message_type: type[M], data: bytes) -> M:
    """Parse and validate in one step: the only way inbound bytes should become a message.

    Raises `MalformedMessage` if `data` does not parse, `ContractViolation` if it breaks its contract.
    """
    message = parse(message_type, data)
    validator = VALIDATORS.get(message_type)
    if validator is not None:
        validator(message)
    return message
