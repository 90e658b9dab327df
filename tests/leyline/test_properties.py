"""Property tests: messages round-trip; random bytes give a typed error or a message, never a crash."""

from __future__ import annotations

from google.protobuf.message import Message
from hypothesis import given, settings
from hypothesis import strategies as st

from esper.leyline import ContractViolation, MalformedMessage, parse, parse_validated, pb, serialize

finite = st.floats(allow_nan=False, allow_infinity=False)
text = st.text(max_size=40)
stages = st.sampled_from(list(pb.SeedLifecycleStage.values()))


@st.composite
def seed_states(draw: st.DrawFn) -> pb.SeedState:
    return pb.SeedState(
        seed_id=draw(text),
        stage=draw(stages),
        gradient_norm=draw(finite),
        learning_rate=draw(finite),
        layer_depth=draw(st.integers(0, 2**32 - 1)),
        metrics=draw(st.dictionaries(text, finite, max_size=4)),
        age_epochs=draw(st.integers(0, 1000)),
        slot_id=draw(text),
        blueprint_id=draw(text),
    )


@st.composite
def packets(draw: st.DrawFn) -> pb.SystemStatePacket:
    packet = pb.SystemStatePacket(
        version=draw(st.integers(0, 10)),
        current_epoch=draw(st.integers(0, 10_000)),
        validation_accuracy=draw(finite),
        validation_loss=draw(finite),
        timestamp_ns=draw(st.integers(0, 2**63)),
        packet_id=draw(text),
        training_run_id=draw(text),
        global_step=draw(st.integers(0, 2**40)),
        training_loss=draw(finite),
        training_metrics=draw(st.dictionaries(text, finite, max_size=5)),
        blueprint_ids=draw(st.lists(text, max_size=5)),
    )
    packet.seed_states.extend(draw(st.lists(seed_states(), max_size=4)))
    return packet


@given(packets())
def test_packets_round_trip(packet: pb.SystemStatePacket) -> None:
    assert parse(pb.SystemStatePacket, serialize(packet)) == packet


@given(st.text(), finite, st.integers(0, 2**31))
def test_field_reports_round_trip(report_id: str, delta: float, window: int) -> None:
    report = pb.FieldReport(report_id=report_id, metrics={"delta": delta}, observation_window_epochs=window)
    report.issued_at.FromNanoseconds(123)
    again = parse(pb.FieldReport, serialize(report))
    assert again == report
    assert again.metrics["delta"] == delta


MESSAGE_TYPES = [
    pb.SystemStatePacket,
    pb.AdaptationCommand,
    pb.FieldReport,
    pb.PolicyUpdate,
    pb.DecisionRecord,
    pb.TelemetryPacket,
    pb.BusEnvelope,
    pb.EmergencySignal,
    pb.BlueprintDescriptor,
]


@settings(max_examples=400)
@given(st.sampled_from(MESSAGE_TYPES), st.binary(max_size=256))
def test_random_bytes_parse_or_raise_malformed(message_type: type, data: bytes) -> None:
    try:
        message = parse(message_type, data)
    except MalformedMessage as exc:
        assert exc.message_type == message_type.DESCRIPTOR.name
    else:
        assert isinstance(message, message_type)


def test_non_bytes_input_is_malformed() -> None:
    try:
        parse(pb.FieldReport, "not bytes")  # type: ignore[arg-type]
    except MalformedMessage as exc:
        assert "expected bytes" in str(exc)
    else:
        raise AssertionError("a str was accepted as wire bytes")


def _mutated(data: bytes, flips: list[tuple[int, int]], cut: int | None) -> bytes:
    damaged = bytearray(data)
    for index, mask in flips:
        if damaged:
            damaged[index % len(damaged)] ^= mask
    return bytes(damaged[:cut] if cut is not None else damaged)


def _parses_validated_or_raises_typed(message_type: type[Message], data: bytes) -> None:
    try:
        message = parse_validated(message_type, data)
    except MalformedMessage as exc:
        assert exc.message_type == message_type.DESCRIPTOR.name
    except ContractViolation as exc:
        assert exc.field
    else:
        assert isinstance(message, message_type)


@settings(max_examples=400)
@given(st.sampled_from(MESSAGE_TYPES), st.binary(max_size=256))
def test_random_bytes_parse_validated_or_raise_typed(message_type: type[Message], data: bytes) -> None:
    _parses_validated_or_raises_typed(message_type, data)


@settings(max_examples=300)
@given(
    packets(),
    st.sampled_from(MESSAGE_TYPES),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), max_size=6),
    st.none() | st.integers(0, 2_000),
)
def test_damaged_messages_parse_validated_or_raise_typed(
    packet: pb.SystemStatePacket,
    message_type: type[Message],
    flips: list[tuple[int, int]],
    cut: int | None,
) -> None:
    """A real message's bytes, flipped and cut, read as any type: a message or a typed error."""
    _parses_validated_or_raises_typed(message_type, _mutated(serialize(packet), flips, cut))
