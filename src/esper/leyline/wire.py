"""Wire compatibility with the original Leyline schema, and the contract version of stored messages.

Where Esper carries a value in a wider type than the original schema (a double where it had a float, a
number where it had text), the message has two fields: Esper's, under the plain name at a new number, and
the original one, at the original number under a suffixed name. `fill_original_fields` copies Esper's
values into the original fields (every `serialize` does it), so a reader of the original schema finds
them; `adopt_original_fields` fills an unset Esper field from its original field (every `parse` does it),
so bytes from a writer of the original schema lose nothing. Code reads and writes the Esper names only.

`CONTRACT_VERSION` numbers the field numbering: stores and buses that keep serialised messages record it
and refuse bytes of another version (`ContractVersionMismatch`) instead of misreading them.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from esper.leyline import leyline_pb2 as pb
from esper.leyline.errors import ContractVersionMismatch

# 1: Esper's first numbering (shifted FieldReport, TelemetryEvent, BlueprintDescriptor; doubles at the
#    original's float numbers). 2: the original schema's numbering and types, Esper's additions after.
CONTRACT_VERSION = 2

# Stores written before the contract version was recorded hold version 1.
UNVERSIONED = 1

M = TypeVar("M", bound=Message)

_Kind = Literal["scalar", "map", "text_map"]

# message -> (Esper field, original field, how the original carries it)
_MIRRORS: dict[str, tuple[tuple[str, str, _Kind], ...]] = {
    "HardwareContext": (
        ("total_memory_gb", "total_memory_gb_f32", "scalar"),
        ("available_memory_gb", "available_memory_gb_f32", "scalar"),
        ("temperature_celsius", "temperature_celsius_f32", "scalar"),
        ("utilization_percent", "utilization_percent_f32", "scalar"),
    ),
    "SeedState": (
        ("gradient_norm", "gradient_norm_f32", "scalar"),
        ("learning_rate", "learning_rate_f32", "scalar"),
        ("risk_score", "risk_score_f32", "scalar"),
        ("metrics", "metrics_f32", "map"),
    ),
    "SystemStatePacket": (
        ("validation_accuracy", "validation_accuracy_f32", "scalar"),
        ("validation_loss", "validation_loss_f32", "scalar"),
        ("training_loss", "training_loss_f32", "scalar"),
        ("training_metrics", "training_metrics_f32", "map"),
    ),
    "CommandSeedOperation": (("parameters", "parameters_f32", "map"),),
    "CommandOptimizerAdjustment": (("hyperparameters", "hyperparameters_f32", "map"),),
    "FieldReport": (("metrics", "metrics_f32", "map"),),
    "SystemHealth": (("indicators", "indicators_text", "text_map"),),
    "BlueprintDescriptor": (("risk", "risk_f32", "scalar"),),
}


@functools.cache
def _reaches_mirrors(descriptor: Descriptor, seen: frozenset[str] = frozenset()) -> bool:
    if descriptor.name in _MIRRORS and descriptor.file is pb.DESCRIPTOR:
        return True
    if descriptor.full_name in seen:
        return False
    inner = seen | {descriptor.full_name}
    return any(
        field.message_type is not None and _reaches_mirrors(field.message_type, inner)
        for field in descriptor.fields
    )


# Message fields worth descending into, per message type: those whose type holds a mirrored field.
_DESCEND: dict[str, tuple[FieldDescriptor, ...]] = {
    message.full_name: tuple(
        field
        for field in message.fields
        if field.message_type is not None
        and not field.message_type.GetOptions().map_entry
        and _reaches_mirrors(field.message_type)
    )
    for message in pb.DESCRIPTOR.message_types_by_name.values()
}


def _children(message: Message) -> list[Message]:
    found: list[Message] = []
    for field in _DESCEND.get(message.DESCRIPTOR.full_name, ()):
        if field.is_repeated:
            found.extend(getattr(message, field.name))
        elif message.HasField(field.name):
            found.append(getattr(message, field.name))
    return found


def _mirrors_of(message: Message) -> tuple[tuple[str, str, _Kind], ...]:
    descriptor = message.DESCRIPTOR
    if descriptor.file is not pb.DESCRIPTOR:
        return ()
    return _MIRRORS.get(descriptor.name, ())


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def with_original_fields(message: M) -> M:
    """`message` itself when nothing in it mirrors, else a copy with the original fields filled."""
    if not _reaches_mirrors(message.DESCRIPTOR):
        return message
    copy = type(message)()
    copy.CopyFrom(message)
    fill_original_fields(copy)
    return copy


def fill_original_fields(message: Message) -> None:
    """Write Esper's values into the original schema's fields, in place (idempotent)."""
    for ours, original, kind in _mirrors_of(message):
        if kind == "scalar":
            if message.HasField(ours):
                setattr(message, original, getattr(message, ours))
            else:
                message.ClearField(original)
        elif kind == "map":
            target = getattr(message, original)
            target.clear()
            target.update(getattr(message, ours))
        else:
            # Text that is not a number has no Esper counterpart: it stays; numbers are Esper's.
            text = getattr(message, original)
            kept = {key: value for key, value in text.items() if _number(value) is None}
            text.clear()
            text.update(kept)
            source: Mapping[str, float] = getattr(message, ours)
            for key, number in source.items():
                text[key] = repr(float(number))
    for child in _children(message):
        fill_original_fields(child)


def adopt_original_fields(message: Message) -> None:
    """Move each original field's value into its unset Esper field, in place; a set Esper field wins.

    The original fields are left empty (text that is no number stays), so a parsed message equals one
    built in code with the Esper names.
    """
    for ours, original, kind in _mirrors_of(message):
        if kind == "scalar":
            value = getattr(message, original)
            if not message.HasField(ours) and value != 0.0:
                setattr(message, ours, value)
            message.ClearField(original)
            continue
        target = getattr(message, ours)
        source: Any = getattr(message, original)
        adopt = not len(target)
        for key, value in list(source.items()):
            number = value if kind == "map" else _number(value)
            if number is None:
                continue  # a text value that is no number stays readable in `original`
            if adopt:
                target[key] = number
            del source[key]
    for child in _children(message):
        adopt_original_fields(child)


def check_contract_version(where: str, found: int) -> None:
    """Refuse stored messages of another contract version (`ContractVersionMismatch`)."""
    if found != CONTRACT_VERSION:
        raise ContractVersionMismatch(where, found, CONTRACT_VERSION)


_CONTRACT_TABLE = "leyline_contract"


def guard_sqlite_contract(db: sqlite3.Connection, where: str) -> None:
    """Record the contract version in a new database; refuse a database of another version.

    Call it at open, before creating any table: a database with tables but no record was written before
    the version was recorded (version 1). Raises `ContractVersionMismatch`.
    """
    db.execute("BEGIN IMMEDIATE")  # two processes opening one new file agree on who records it
    try:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if _CONTRACT_TABLE in tables:
            row = db.execute(f"SELECT MAX(version) FROM {_CONTRACT_TABLE}").fetchone()
            found = UNVERSIONED if row is None or row[0] is None else int(row[0])
        elif tables:
            found = UNVERSIONED
        else:
            db.execute(f"CREATE TABLE {_CONTRACT_TABLE} (version INTEGER NOT NULL)")
            db.execute(f"INSERT INTO {_CONTRACT_TABLE} (version) VALUES (?)", (CONTRACT_VERSION,))
            found = CONTRACT_VERSION
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    check_contract_version(where, found)
