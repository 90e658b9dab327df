"""Helpers for Leyline enums: short names in and out, so logs and CLIs never show raw numbers."""

from __future__ import annotations

from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from esper.leyline import leyline_pb2 as pb
from esper.leyline.errors import ContractViolation

_PREFIXES: dict[str, str] = {
    "SeedLifecycleStage": "SEED_STAGE_",
    "SeedLifecycleGate": "SEED_GATE_",
    "CommandType": "COMMAND_",
    "SeedOperation": "SEED_OP_",
    "BlendMode": "BLEND_MODE_",
    "PolicyAction": "POLICY_ACTION_",
    "FieldReportOutcome": "FIELD_REPORT_OUTCOME_",
    "MessagePriority": "MESSAGE_PRIORITY_",
    "TelemetryLevel": "TELEMETRY_LEVEL_",
    "HealthStatus": "HEALTH_STATUS_",
    "BlueprintTier": "BLUEPRINT_TIER_",
    "EmergencyLevel": "EMERGENCY_LEVEL_",
    "CircuitBreakerState": "CIRCUIT_STATE_",
    "CatalogueChangeKind": "CATALOGUE_CHANGE_",
    "BusMessageType": "BUS_MESSAGE_TYPE_",
}


def short_name(enum: EnumTypeWrapper, value: int) -> str:
    """`short_name(pb.SeedLifecycleStage, 1) == "DORMANT"`; an unknown value is an error."""
    try:
        full = enum.Name(value)
    except ValueError as exc:
        raise ContractViolation(enum.DESCRIPTOR.name, "value", f"{value} is not a known value") from exc
    return full.removeprefix(_PREFIXES[enum.DESCRIPTOR.name])


def value_label(enum: EnumTypeWrapper, value: int) -> str:
    """`short_name`, or `"99 (unknown SeedOperation)"` for a value this build does not know: for messages
    about values received from elsewhere, which may be anything."""
    try:
        return short_name(enum, value)
    except ContractViolation:
        return f"{value} (unknown {enum.DESCRIPTOR.name})"


def from_short_name(enum: EnumTypeWrapper, name: str) -> int:
    """Inverse of `short_name`, case-insensitive; an unknown name is an error listing the valid ones."""
    prefix = _PREFIXES[enum.DESCRIPTOR.name]
    try:
        return int(enum.Value(prefix + name.upper()))
    except ValueError as exc:
        valid = ", ".join(n.removeprefix(prefix) for n in enum.keys())  # noqa: SIM118 (EnumTypeWrapper is not a dict)
        raise ContractViolation(enum.DESCRIPTOR.name, "name", f"{name!r} is not one of {valid}") from exc


STAGE_NAMES: dict[int, str] = {
    value: short_name(pb.SeedLifecycleStage, value) for value in pb.SeedLifecycleStage.values()
}
