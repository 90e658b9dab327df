"""Leyline speaks the original schema's wire format where a message existed there.

`ORIGINAL` is the original contracts' numbering, written down as data (message -> fields as (number,
name, type)); the original side of the round trips is built from it with a descriptor pool of its own,
so nothing is fetched and no code of the original project runs.
"""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2, timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from esper.leyline import CONTRACT_VERSION, parse, pb, serialize

# Types: a scalar name, "enum:<Enum>", "msg:<Message>" (google.* for well-known types), "map:<key>:<value>",
# and "repeated <type>" for repeated fields.
ORIGINAL: dict[str, list[tuple[int, str, str]]] = {
    "HardwareContext": [
        (1, "device_type", "string"),
        (2, "device_id", "string"),
        (3, "total_memory_gb", "float"),
        (4, "available_memory_gb", "float"),
        (5, "temperature_celsius", "float"),
        (6, "utilization_percent", "float"),
        (7, "compute_capability", "uint32"),
    ],
    "SeedState": [
        (1, "seed_id", "string"),
        (2, "stage", "enum:SeedLifecycleStage"),
        (3, "gradient_norm", "float"),
        (4, "learning_rate", "float"),
        (5, "layer_depth", "uint32"),
        (6, "metrics", "map:string:float"),
        (7, "age_epochs", "uint32"),
        (8, "risk_score", "float"),
    ],
    "SystemStatePacket": [
        (1, "version", "uint32"),
        (2, "current_epoch", "uint32"),
        (3, "validation_accuracy", "float"),
        (4, "validation_loss", "float"),
        (5, "timestamp_ns", "uint64"),
        (6, "hardware_context", "msg:HardwareContext"),
        (7, "training_metrics", "map:string:float"),
        (8, "seed_states", "repeated msg:SeedState"),
        (9, "packet_id", "string"),
        (10, "global_step", "uint64"),
        (11, "training_loss", "float"),
        (12, "source_subsystem", "string"),
        (13, "training_run_id", "string"),
        (14, "experiment_name", "string"),
    ],
    "CommandSeedOperation": [
        (1, "operation", "enum:SeedOperation"),
        (2, "blueprint_id", "string"),
        (3, "parameters", "map:string:float"),
    ],
    "CommandOptimizerAdjustment": [
        (1, "optimizer_id", "string"),
        (2, "hyperparameters", "map:string:float"),
    ],
    "CommandCircuitBreaker": [
        (1, "desired_state", "enum:CircuitBreakerState"),
        (2, "rationale", "string"),
    ],
    "EmergencySignal": [
        (1, "version", "uint32"),
        (2, "level", "enum:EmergencyLevel"),
        (3, "reason", "string"),
        (4, "origin", "string"),
        (5, "triggered_at", "msg:google.protobuf.Timestamp"),
        (6, "monotonic_time_ms", "uint64"),
        (7, "run_id", "string"),
        (8, "attributes", "map:string:string"),
        (9, "payload_checksum", "bytes"),
    ],
    "AdaptationCommand": [
        (1, "version", "uint32"),
        (2, "command_id", "string"),
        (3, "command_type", "enum:CommandType"),
        (4, "target_seed_id", "string"),
        (5, "execution_deadline_ms", "uint32"),
        (6, "issued_at", "msg:google.protobuf.Timestamp"),
        (7, "issued_by", "string"),
        (10, "seed_operation", "msg:CommandSeedOperation"),
        (11, "optimizer_adjustment", "msg:CommandOptimizerAdjustment"),
        (12, "circuit_breaker", "msg:CommandCircuitBreaker"),
        (13, "rollback_payload", "msg:google.protobuf.Struct"),
        (20, "annotations", "map:string:string"),
    ],
    "MitigationAction": [
        (1, "action_type", "string"),
        (2, "rationale", "string"),
    ],
    "FieldReport": [
        (1, "version", "uint32"),
        (2, "report_id", "string"),
        (3, "command_id", "string"),
        (4, "training_run_id", "string"),
        (5, "seed_id", "string"),
        (6, "blueprint_id", "string"),
        (7, "outcome", "enum:FieldReportOutcome"),
        (8, "metrics", "map:string:float"),
        (9, "observation_window_epochs", "uint32"),
        (10, "issued_at", "msg:google.protobuf.Timestamp"),
        (11, "tamiyo_policy_version", "string"),
        (12, "follow_up_actions", "repeated msg:MitigationAction"),
        (13, "notes", "string"),
    ],
    "BlueprintParameterBounds": [
        (1, "min_value", "double"),
        (2, "max_value", "double"),
    ],
    "BlueprintDescriptor": [
        (1, "blueprint_id", "string"),
        (2, "name", "string"),
        (3, "tier", "enum:BlueprintTier"),
        (4, "allowed_parameters", "map:string:msg:BlueprintParameterBounds"),
        (5, "risk", "float"),
        (6, "stage", "uint32"),
        (7, "quarantine_only", "bool"),
        (8, "approval_required", "bool"),
        (9, "description", "string"),
    ],
    "BusEnvelope": [
        (1, "message_type", "enum:BusMessageType"),
        (2, "payload", "bytes"),
        (3, "attributes", "map:string:string"),
    ],
    "PolicyUpdate": [
        (1, "version", "uint32"),
        (2, "policy_id", "string"),
        (3, "training_run_id", "string"),
        (4, "issued_at", "msg:google.protobuf.Timestamp"),
        (5, "tamiyo_policy_version", "string"),
        (6, "payload", "bytes"),
    ],
    "MetricPoint": [
        (1, "name", "string"),
        (2, "value", "double"),
        (3, "unit", "string"),
        (4, "attributes", "map:string:string"),
    ],
    "TelemetryEvent": [
        (1, "event_id", "string"),
        (2, "description", "string"),
        (3, "level", "enum:TelemetryLevel"),
        (4, "attributes", "map:string:string"),
    ],
    "TraceSpan": [
        (1, "span_id", "string"),
        (2, "parent_span_id", "string"),
        (3, "name", "string"),
        (4, "start_time", "msg:google.protobuf.Timestamp"),
        (5, "end_time", "msg:google.protobuf.Timestamp"),
        (6, "attributes", "map:string:string"),
    ],
    "SystemHealth": [
        (1, "status", "enum:HealthStatus"),
        (2, "summary", "string"),
        (3, "indicators", "map:string:string"),
    ],
    "TelemetryPacket": [
        (1, "packet_id", "string"),
        (2, "timestamp", "msg:google.protobuf.Timestamp"),
        (3, "source_subsystem", "string"),
        (4, "level", "enum:TelemetryLevel"),
        (10, "metrics", "repeated msg:MetricPoint"),
        (20, "events", "repeated msg:TelemetryEvent"),
        (30, "spans", "repeated msg:TraceSpan"),
        (40, "system_health", "msg:SystemHealth"),
    ],
}

# Fields of the original that share a oneof: message -> (oneof name, member numbers).
ORIGINAL_ONEOFS: dict[str, tuple[str, tuple[int, ...]]] = {"AdaptationCommand": ("payload", (10, 11, 12, 13))}

# The original's enum values (number -> name) of the enums its messages carry.
ORIGINAL_ENUMS: dict[str, dict[int, str]] = {
    "SeedLifecycleStage": {
        0: "SEED_STAGE_UNKNOWN",
        1: "SEED_STAGE_DORMANT",
        2: "SEED_STAGE_GERMINATED",
        3: "SEED_STAGE_TRAINING",
        4: "SEED_STAGE_BLENDING",
        5: "SEED_STAGE_SHADOWING",
        6: "SEED_STAGE_PROBATIONARY",
        7: "SEED_STAGE_FOSSILIZED",
        8: "SEED_STAGE_CULLED",
        9: "SEED_STAGE_EMBARGOED",
        10: "SEED_STAGE_RESETTING",
        11: "SEED_STAGE_TERMINATED",
    },
    "HealthStatus": {
        0: "HEALTH_STATUS_UNKNOWN",
        1: "HEALTH_STATUS_HEALTHY",
        2: "HEALTH_STATUS_DEGRADED",
        3: "HEALTH_STATUS_UNHEALTHY",
        4: "HEALTH_STATUS_CRITICAL",
    },
    "CircuitBreakerState": {
        0: "CIRCUIT_STATE_UNKNOWN",
        1: "CIRCUIT_STATE_CLOSED",
        2: "CIRCUIT_STATE_OPEN",
        3: "CIRCUIT_STATE_HALF_OPEN",
    },
    "CommandType": {
        0: "COMMAND_UNKNOWN",
        1: "COMMAND_SEED",
        2: "COMMAND_ROLLBACK",
        3: "COMMAND_OPTIMIZER",
        4: "COMMAND_CIRCUIT_BREAKER",
        5: "COMMAND_PAUSE",
        6: "COMMAND_EMERGENCY",
        7: "COMMAND_STRUCTURAL_PRUNING",
    },
    "SeedOperation": {
        0: "SEED_OP_UNKNOWN",
        1: "SEED_OP_GERMINATE",
        2: "SEED_OP_START_TRAINING",
        3: "SEED_OP_START_GRAFTING",
        4: "SEED_OP_STABILIZE",
        5: "SEED_OP_EVALUATE",
        6: "SEED_OP_FINE_TUNE",
        7: "SEED_OP_FOSSILIZE",
        8: "SEED_OP_CULL",
        9: "SEED_OP_CANCEL",
    },
    "TelemetryLevel": {
        0: "TELEMETRY_LEVEL_UNSPECIFIED",
        1: "TELEMETRY_LEVEL_INFO",
        2: "TELEMETRY_LEVEL_WARNING",
        3: "TELEMETRY_LEVEL_ERROR",
        4: "TELEMETRY_LEVEL_CRITICAL",
    },
    "EmergencyLevel": {
        0: "EMERGENCY_LEVEL_UNSPECIFIED",
        1: "EMERGENCY_LEVEL_NOTICE",
        2: "EMERGENCY_LEVEL_ELEVATED",
        3: "EMERGENCY_LEVEL_CONSERVATIVE",
        4: "EMERGENCY_LEVEL_HALT",
    },
    "FieldReportOutcome": {
        0: "FIELD_REPORT_OUTCOME_UNSPECIFIED",
        1: "FIELD_REPORT_OUTCOME_SUCCESS",
        2: "FIELD_REPORT_OUTCOME_NEUTRAL",
        3: "FIELD_REPORT_OUTCOME_REGRESSION",
        4: "FIELD_REPORT_OUTCOME_ABORTED",
    },
    "BlueprintTier": {
        0: "BLUEPRINT_TIER_UNSPECIFIED",
        1: "BLUEPRINT_TIER_SAFE",
        2: "BLUEPRINT_TIER_EXPERIMENTAL",
        3: "BLUEPRINT_TIER_HIGH_RISK",
    },
    "BusMessageType": {
        0: "BUS_MESSAGE_TYPE_UNSPECIFIED",
        1: "BUS_MESSAGE_TYPE_SYSTEM_STATE",
        2: "BUS_MESSAGE_TYPE_ADAPTATION_COMMAND",
        3: "BUS_MESSAGE_TYPE_FIELD_REPORT",
        4: "BUS_MESSAGE_TYPE_TELEMETRY",
        5: "BUS_MESSAGE_TYPE_POLICY_UPDATE",
        6: "BUS_MESSAGE_TYPE_KERNEL_PREFETCH_REQUEST",
        7: "BUS_MESSAGE_TYPE_KERNEL_PREFETCH_READY",
        8: "BUS_MESSAGE_TYPE_KERNEL_PREFETCH_ERROR",
        9: "BUS_MESSAGE_TYPE_KERNEL_CATALOG_UPDATE",
        10: "BUS_MESSAGE_TYPE_EMERGENCY_SIGNAL",
        20: "BUS_MESSAGE_TYPE_BSDS_ISSUED",
        21: "BUS_MESSAGE_TYPE_BSDS_FAILED",
        22: "BUS_MESSAGE_TYPE_BENCHMARK_REPORT",
    },
    "MessagePriority": {
        0: "MESSAGE_PRIORITY_UNSPECIFIED",
        1: "MESSAGE_PRIORITY_LOW",
        2: "MESSAGE_PRIORITY_NORMAL",
        3: "MESSAGE_PRIORITY_HIGH",
        4: "MESSAGE_PRIORITY_CRITICAL",
    },
}

# Same number, same meaning, another name here. The `_f32`/`_text` fields are the original fields that
# mirror Esper's wider ones (see the head of contracts/leyline.proto); every other rename is listed.
RENAMED: dict[tuple[str, str], str] = {("EmergencySignal", "run_id"): "training_run_id"}
MIRROR_SUFFIXES = ("_f32", "_text")
# Enum values the original carries that Esper does not implement: reserved, never given another meaning.
UNSUPPORTED_VALUES = {
    ("CommandType", 7),
    *(("SeedOperation", n) for n in range(2, 7)),
    *(("BusMessageType", n) for n in (6, 7, 8, 9, 20, 21, 22)),
}

_SCALARS = {
    "double": FieldDescriptor.TYPE_DOUBLE,
    "float": FieldDescriptor.TYPE_FLOAT,
    "uint32": FieldDescriptor.TYPE_UINT32,
    "uint64": FieldDescriptor.TYPE_UINT64,
    "string": FieldDescriptor.TYPE_STRING,
    "bytes": FieldDescriptor.TYPE_BYTES,
    "bool": FieldDescriptor.TYPE_BOOL,
}
_PACKAGE = "esper.leyline.v1"


def _type_of(spec: str) -> tuple[int, str]:
    """(FieldDescriptor type, full type name or '') of a non-repeated, non-map type spec."""
    if spec.startswith("enum:"):
        return FieldDescriptor.TYPE_ENUM, f".{_PACKAGE}.{spec[5:]}"
    if spec.startswith("msg:"):
        name = spec[4:]
        return FieldDescriptor.TYPE_MESSAGE, f".{name}" if name.startswith(
            "google."
        ) else f".{_PACKAGE}.{name}"
    return _SCALARS[spec], ""


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def _original_file() -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto(
        name="original/leyline.proto",
        package=_PACKAGE,
        syntax="proto3",
        dependency=["google/protobuf/struct.proto", "google/protobuf/timestamp.proto"],
    )
    for enum_name, values in ORIGINAL_ENUMS.items():
        enum = proto.enum_type.add(name=enum_name)
        for number, value_name in values.items():
            enum.value.add(name=value_name, number=number)
    for message_name, fields in ORIGINAL.items():
        message = proto.message_type.add(name=message_name)
        oneof_name, oneof_members = ORIGINAL_ONEOFS.get(message_name, ("", ()))
        if oneof_name:
            message.oneof_decl.add(name=oneof_name)
        for number, field_name, written_spec in fields:
            spec = written_spec
            field = message.field.add(name=field_name, number=number, label=FieldDescriptor.LABEL_OPTIONAL)
            if number in oneof_members:
                field.oneof_index = 0
            if spec.startswith("repeated "):
                field.label = FieldDescriptor.LABEL_REPEATED  # type: ignore[assignment]
                spec = spec[len("repeated ") :]
            if spec.startswith("map:"):
                key_spec, value_spec = spec[4:].split(":", 1)
                entry = message.nested_type.add(name=f"{_camel(field_name)}Entry")
                entry.options.map_entry = True
                for entry_number, entry_name, entry_spec in ((1, "key", key_spec), (2, "value", value_spec)):
                    entry_type, entry_type_name = _type_of(entry_spec)
                    entry_field = entry.field.add(
                        name=entry_name,
                        number=entry_number,
                        label=FieldDescriptor.LABEL_OPTIONAL,
                        type=entry_type,  # type: ignore[arg-type]
                    )
                    if entry_type_name:
                        entry_field.type_name = entry_type_name
                field.label = FieldDescriptor.LABEL_REPEATED  # type: ignore[assignment]
                field.type = FieldDescriptor.TYPE_MESSAGE  # type: ignore[assignment]
                field.type_name = f".{_PACKAGE}.{message_name}.{entry.name}"
                continue
            field_type, type_name = _type_of(spec)
            field.type = field_type  # type: ignore[assignment]
            if type_name:
                field.type_name = type_name
    return proto


def _original_classes() -> dict[str, type[Message]]:
    pool = descriptor_pool.DescriptorPool()
    for dependency in (struct_pb2, timestamp_pb2):
        pool.AddSerializedFile(dependency.DESCRIPTOR.serialized_pb)
    pool.Add(_original_file())
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.{name}"))
        for name in ORIGINAL
    }


ORIGINAL_CLASSES = _original_classes()
SHARED = sorted(name for name in ORIGINAL if hasattr(pb, name))


# -- the compatibility check ------------------------------------------------------------------------------


def _same_meaning(message: str, original_name: str, ours: str) -> bool:
    if ours == original_name or RENAMED.get((message, original_name)) == ours:
        return True
    return any(ours == original_name + suffix for suffix in MIRROR_SUFFIXES)


def test_every_original_message_is_still_here() -> None:
    assert sorted(ORIGINAL) == SHARED


@pytest.mark.parametrize("message", sorted(ORIGINAL))
def test_every_original_field_keeps_its_number_type_label_and_meaning(message: str) -> None:
    original = ORIGINAL_CLASSES[message].DESCRIPTOR
    ours = getattr(pb, message).DESCRIPTOR
    for field in original.fields:
        assert field.number in ours.fields_by_number, f"{message}.{field.name} ({field.number}) is gone"
        mine = ours.fields_by_number[field.number]
        where = f"{message} field {field.number} ({field.name} in the original, {mine.name} here)"
        assert _same_meaning(message, field.name, mine.name), f"{where}: another meaning"
        assert mine.type == field.type, f"{where}: type {mine.type}, the original has {field.type}"
        assert mine.is_repeated == field.is_repeated, (
            f"{where}: repeated {mine.is_repeated} here, {field.is_repeated} there"
        )
        if field.message_type is not None:
            assert mine.message_type is not None
            assert mine.message_type.GetOptions().map_entry == field.message_type.GetOptions().map_entry
            if field.message_type.GetOptions().map_entry:
                for side in ("key", "value"):
                    theirs_entry = field.message_type.fields_by_name[side]
                    mine_entry = mine.message_type.fields_by_name[side]
                    assert mine_entry.type == theirs_entry.type, f"{where}: map {side} type differs"
            else:
                assert mine.message_type.name == field.message_type.name, f"{where}: message type differs"
        if field.enum_type is not None:
            assert mine.enum_type is not None and mine.enum_type.name == field.enum_type.name


@pytest.mark.parametrize("enum", sorted(ORIGINAL_ENUMS))
def test_every_original_enum_value_keeps_its_number_and_meaning(enum: str) -> None:
    ours = getattr(pb, enum).DESCRIPTOR
    for number, name in ORIGINAL_ENUMS[enum].items():
        mine = ours.values_by_number.get(number)
        if (enum, number) in UNSUPPORTED_VALUES:
            assert mine is None, f"{enum} value {number} ({name} in the original) was given to {mine.name}"
            continue
        assert mine is not None, f"{enum} value {number} ({name}) is gone"
        if number == 0:
            continue  # the unset default: UNKNOWN there, UNSPECIFIED here
        assert mine.name == name, f"{enum} value {number} is {mine.name} here, {name} in the original"


def test_the_contract_version_moved_past_the_first_numbering() -> None:
    assert CONTRACT_VERSION == 2


# -- round trips ---------------------------------------------------------------------------------------------


def _fill(message: Message, depth: int = 0) -> Message:  # noqa: C901, PLR0912 (fills one field of each protobuf type)
    """Set every field of `message` to a non-default value (nested messages to a small depth)."""
    for field in message.DESCRIPTOR.fields:
        if field.name.endswith(MIRROR_SUFFIXES):
            continue  # code never writes the original fields that mirror Esper's
        if field.containing_oneof is not None and field.number != field.containing_oneof.fields[0].number:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            target = getattr(message, field.name)
            for index in range(2):
                key = f"k{index}"
                if value_field.message_type is not None:
                    _fill(target[key], depth + 1)
                else:
                    target[key] = _scalar(value_field, field.number + index)
        elif field.message_type is not None:
            if depth > 3:
                continue
            if field.is_repeated:
                for _ in range(2):
                    _fill(getattr(message, field.name).add(), depth + 1)
            else:
                _fill(getattr(message, field.name), depth + 1)
        elif field.is_repeated:
            getattr(message, field.name).extend(
                [_scalar(field, field.number), _scalar(field, field.number + 1)]
            )
        else:
            setattr(message, field.name, _scalar(field, field.number))
    if message.DESCRIPTOR.full_name == "google.protobuf.Struct":
        message["k"] = 1.5  # type: ignore[index]
    return message


def _scalar(field: Any, number: int) -> Any:
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return number + 0.25  # exact in float32: the shared value compares equal on both sides
    if field.type == FieldDescriptor.TYPE_STRING:
        return f"{field.name}-{number}"
    if field.type == FieldDescriptor.TYPE_BYTES:
        return f"{field.name}-{number}".encode()
    if field.type == FieldDescriptor.TYPE_BOOL:
        return True
    if field.type == FieldDescriptor.TYPE_ENUM:
        return 1  # value 1 means the same in both schemas for every shared enum
    return number + 1


def _assert_shared_fields_equal(original: Message, ours: Message, path: str) -> None:  # noqa: C901, PLR0912 (compares one field of each protobuf type)
    ours_fields = ours.DESCRIPTOR.fields_by_number
    for field in original.DESCRIPTOR.fields:
        mine = ours_fields[field.number]
        theirs_value = getattr(original, field.name)
        where = f"{path}.{field.name}"
        if mine.name.endswith("_f32"):  # compare with the Esper field it mirrors
            our_value = getattr(ours, mine.name.removesuffix("_f32"))
            assert (dict(theirs_value) if field.message_type else theirs_value) == (
                dict(our_value) if field.message_type else our_value
            ), where
            continue
        if mine.name.endswith("_text"):  # numbers from the Esper field, other text kept as it came
            numbers = getattr(ours, mine.name.removesuffix("_text"))
            expected = {**dict(getattr(ours, mine.name)), **{k: repr(v) for k, v in numbers.items()}}
            assert dict(theirs_value) == expected, where
            continue
        our_value = getattr(ours, mine.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            if field.message_type.fields_by_name["value"].message_type is not None:
                assert sorted(theirs_value) == sorted(our_value), where
                for key in theirs_value:
                    _assert_shared_fields_equal(theirs_value[key], our_value[key], f"{where}[{key}]")
            else:
                assert dict(theirs_value) == dict(our_value), where
        elif field.message_type is not None and field.message_type.full_name.startswith("google."):
            if field.is_repeated:
                assert [m.SerializeToString() for m in theirs_value] == [
                    m.SerializeToString() for m in our_value
                ]
            else:
                assert theirs_value.SerializeToString() == our_value.SerializeToString(), where
        elif field.message_type is not None:
            if field.is_repeated:
                assert len(theirs_value) == len(our_value), where
                for index, (a, b) in enumerate(zip(theirs_value, our_value, strict=True)):
                    _assert_shared_fields_equal(a, b, f"{where}[{index}]")
            else:
                assert original.HasField(field.name) == ours.HasField(mine.name), where
                _assert_shared_fields_equal(theirs_value, our_value, where)
        elif field.is_repeated:
            assert list(theirs_value) == list(our_value), where
        else:
            assert theirs_value == our_value, f"{where}: {theirs_value!r} there, {our_value!r} here"


def _our_class(name: str) -> type[Message]:
    cls: type[Message] = getattr(pb, name)
    return cls


@pytest.mark.parametrize("message", sorted(ORIGINAL))
def test_bytes_of_the_original_schema_parse_here_with_every_shared_field_intact(message: str) -> None:
    written = _fill(ORIGINAL_CLASSES[message]())
    ours = parse(_our_class(message), written.SerializeToString())
    _assert_shared_fields_equal(written, ours, message)
    # ... and written back by us, the original schema reads them again unchanged.
    back = ORIGINAL_CLASSES[message].FromString(serialize(ours))
    back.DiscardUnknownFields()
    assert back == written


@pytest.mark.parametrize("message", sorted(ORIGINAL))
def test_our_bytes_parse_in_the_original_schema_with_our_additions_as_unknown_fields(message: str) -> None:
    ours = _fill(_our_class(message)())
    data = serialize(ours)
    theirs = ORIGINAL_CLASSES[message].FromString(data)
    _assert_shared_fields_equal(theirs, ours, message)
    # The original keeps what it does not know and hands it back intact.
    assert parse(_our_class(message), theirs.SerializeToString()) == ours


def _descriptor_fields(descriptor: Descriptor) -> set[str]:
    return {field.name for field in descriptor.fields}


def test_an_original_state_packet_arrives_with_its_accuracy_and_losses() -> None:
    original = ORIGINAL_CLASSES["SystemStatePacket"](
        packet_id="p", validation_accuracy=0.75, validation_loss=0.5, training_loss=1.25
    )
    original.training_metrics["lr"] = 0.125  # type: ignore[attr-defined]
    seed = original.seed_states.add(seed_id="s", gradient_norm=2.5, learning_rate=0.5)  # type: ignore[attr-defined]
    seed.metrics["alpha"] = 0.5
    packet = parse(pb.SystemStatePacket, original.SerializeToString())
    assert (packet.validation_accuracy, packet.validation_loss, packet.training_loss) == (0.75, 0.5, 1.25)
    assert dict(packet.training_metrics) == {"lr": 0.125}
    state = packet.seed_states[0]
    assert (state.gradient_norm, state.learning_rate, dict(state.metrics)) == (2.5, 0.5, {"alpha": 0.5})


def test_an_original_field_report_parses_field_by_field() -> None:
    original = ORIGINAL_CLASSES["FieldReport"](
        version=1,
        report_id="r",
        command_id="c",
        training_run_id="run",
        outcome=1,
        observation_window_epochs=3,
    )
    original.metrics["delta"] = 0.25  # type: ignore[attr-defined]
    report = parse(pb.FieldReport, original.SerializeToString())
    assert (report.report_id, report.command_id, report.training_run_id) == ("r", "c", "run")
    assert report.outcome == pb.FIELD_REPORT_OUTCOME_SUCCESS and report.observation_window_epochs == 3
    assert dict(report.metrics) == {"delta": 0.25}


def test_our_doubles_keep_their_precision_and_reach_the_original_as_floats() -> None:
    packet = pb.SystemStatePacket(packet_id="p", validation_loss=0.1)
    packet.training_metrics["lr"] = 0.1
    data = serialize(packet)
    assert parse(pb.SystemStatePacket, data).validation_loss == 0.1
    theirs = ORIGINAL_CLASSES["SystemStatePacket"].FromString(data)
    assert theirs.validation_loss == pytest.approx(0.1, rel=1e-7)  # type: ignore[attr-defined]
    assert theirs.training_metrics["lr"] == pytest.approx(0.1, rel=1e-7)  # type: ignore[attr-defined]


def test_a_set_esper_field_wins_over_its_original_field() -> None:
    packet = pb.SystemStatePacket(validation_loss=0.1, validation_loss_f32=7.0)
    assert parse(pb.SystemStatePacket, packet.SerializeToString()).validation_loss == 0.1


def test_health_indicators_reach_the_original_as_text_and_come_back_as_numbers() -> None:
    health = pb.SystemHealth(status=pb.HEALTH_STATUS_HEALTHY)
    health.indicators["queue_depth"] = 3.5
    theirs = ORIGINAL_CLASSES["SystemHealth"].FromString(serialize(health))
    assert dict(theirs.indicators) == {"queue_depth": "3.5"}  # type: ignore[attr-defined]
    original = ORIGINAL_CLASSES["SystemHealth"](status=1)
    original.indicators["queue_depth"] = "2.0"  # type: ignore[attr-defined]
    original.indicators["mode"] = "conservative"  # type: ignore[attr-defined]
    ours = parse(pb.SystemHealth, original.SerializeToString())
    assert dict(ours.indicators) == {"queue_depth": 2.0}
    assert dict(ours.indicators_text)["mode"] == "conservative"
