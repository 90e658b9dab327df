"""Fuzzing envelopes: stored bytes decode to an envelope or `MalformedMessage`; an envelope opens to its
message or raises `UnexpectedMessageType`, `MalformedMessage` or `ContractViolation`, never anything else."""

from __future__ import annotations

from google.protobuf.message import Message
from hypothesis import given, settings
from hypothesis import strategies as st

from esper.leyline import ContractViolation, MalformedMessage, pb, serialize
from esper.oona import UnexpectedMessageType, open_envelope
from esper.oona.bus import decode_envelope
from esper.oona.envelopes import MESSAGE_TYPES

carried = st.sampled_from(sorted(MESSAGE_TYPES, key=lambda cls: cls.DESCRIPTOR.name))
message_types = st.sampled_from(sorted(MESSAGE_TYPES.values())) | st.integers(-(2**31), 2**31 - 1)


def _opens_or_raises_typed(envelope: pb.BusEnvelope, message_type: type[Message]) -> None:
    try:
        message = open_envelope(envelope, message_type)
    except UnexpectedMessageType as exc:
        assert exc.actual == envelope.message_type
        assert exc.expected == message_type.DESCRIPTOR.name
    except MalformedMessage as exc:
        assert exc.message_type == message_type.DESCRIPTOR.name
    except ContractViolation as exc:
        assert exc.field
    else:
        assert isinstance(message, message_type)


@settings(max_examples=300)
@given(st.binary(max_size=512))
def test_stored_bytes_decode_to_an_envelope_or_raise_malformed(data: bytes) -> None:
    try:
        envelope = decode_envelope(data)
    except MalformedMessage as exc:
        assert exc.message_type == "BusEnvelope"
    else:
        assert isinstance(envelope, pb.BusEnvelope)


@settings(max_examples=300)
@given(
    message_types,
    st.binary(max_size=256),
    st.text(max_size=20),
    st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
    carried,
)
def test_any_envelope_opens_or_raises_a_typed_error(
    message_type: int,
    payload: bytes,
    message_id: str,
    attributes: dict[str, str],
    wanted: type[Message],
) -> None:
    envelope = pb.BusEnvelope(message_type=message_type, payload=payload, message_id=message_id)
    envelope.attributes.update(attributes)
    again = decode_envelope(serialize(envelope))  # through the wire form, as the backends store it
    _opens_or_raises_typed(again, wanted)
    _opens_or_raises_typed(pb.BusEnvelope(message_type=MESSAGE_TYPES[wanted], payload=payload), wanted)
