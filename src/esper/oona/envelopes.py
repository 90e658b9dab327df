"""Wrapping Leyline messages in bus envelopes, and opening them again with typed errors."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import TypeVar

from google.protobuf.message import Message

from esper.leyline import SYSTEM_CLOCK, Clock, parse_validated, pb, serialize
from esper.oona.bus import BusError

M = TypeVar("M", bound=Message)

# The envelope type of every message that travels on the bus.
MESSAGE_TYPES: dict[type[Message], int] = {
    pb.SystemStatePacket: pb.BUS_MESSAGE_TYPE_SYSTEM_STATE,
    pb.AdaptationCommand: pb.BUS_MESSAGE_TYPE_ADAPTATION_COMMAND,
    pb.FieldReport: pb.BUS_MESSAGE_TYPE_FIELD_REPORT,
    pb.TelemetryPacket: pb.BUS_MESSAGE_TYPE_TELEMETRY,
    pb.PolicyUpdate: pb.BUS_MESSAGE_TYPE_POLICY_UPDATE,
    pb.EmergencySignal: pb.BUS_MESSAGE_TYPE_EMERGENCY_SIGNAL,
    pb.CatalogueChange: pb.BUS_MESSAGE_TYPE_CATALOGUE_CHANGE,
    pb.DecisionRecord: pb.BUS_MESSAGE_TYPE_DECISION_RECORD,
}


class UnexpectedMessageType(BusError):
    """An envelope holds another type of message than the one asked for."""

    def __init__(self, expected: str, actual: int, message_id: str) -> None:
        self.expected = expected
        self.actual = actual
        self.message_id = message_id
        actual_name = pb.BusMessageType.Name(actual) if actual in pb.BusMessageType.values() else str(actual)
        super().__init__(f"envelope {message_id!r} holds {actual_name}, expected {expected}")


def message_type_of(message_type: type[Message]) -> int:
    """The `BusMessageType` of a Leyline message class; `TypeError` for a class that is not carried."""
    try:
        return MESSAGE_TYPES[message_type]
    except KeyError:
        raise TypeError(f"{message_type.__name__} does not travel on the bus") from None


def envelope_for(
    message: Message,
    priority: int = pb.MESSAGE_PRIORITY_NORMAL,
    *,
    trace_id: str = "",
    attributes: Mapping[str, str] | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> pb.BusEnvelope:
    """An envelope holding `message`, with a fresh message id and the publication time."""
    envelope = pb.BusEnvelope(
        message_type=message_type_of(type(message)),
        payload=serialize(message),
        priority=priority,
        message_id=uuid.uuid4().hex,
        trace_id=trace_id,
        published_at_ns=clock.wall_ns(),
    )
    envelope.attributes.update(attributes or {})
    return envelope


def open_envelope(envelope: pb.BusEnvelope, message_type: type[M]) -> M:
    """The message inside `envelope`, parsed and validated.

    Raises `UnexpectedMessageType` if the envelope holds another type, `MalformedMessage` if the payload
    does not parse, `ContractViolation` if it parses but breaks its contract.
    """
    expected = message_type_of(message_type)
    if envelope.message_type != expected:
        raise UnexpectedMessageType(message_type.DESCRIPTOR.name, envelope.message_type, envelope.message_id)
    return parse_validated(message_type, envelope.payload)
