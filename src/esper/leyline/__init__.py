"""Leyline: the contracts every Esper subsystem speaks.

`pb` is the generated protobuf module (messages and enums of `contracts/leyline.proto`). The helpers here
validate, serialise, parse and sign those messages; they import nothing else of Esper.
"""

from esper.leyline import leyline_pb2 as pb
from esper.leyline.backoff import Backoff
from esper.leyline.cleanup import CleanupFailed, CleanupStack
from esper.leyline.clock import SYSTEM_CLOCK, Clock, ManualClock, SystemClock
from esper.leyline.enums import from_short_name, short_name, value_label
from esper.leyline.errors import (
    ConfigurationError,
    ContractVersionMismatch,
    ContractViolation,
    DecisionDeadlineMissed,
    EsperError,
    FutureMessage,
    MalformedMessage,
    ReplayDetected,
    SignatureError,
    SignatureInvalid,
    StaleMessage,
)
from esper.leyline.events import EventSink
from esper.leyline.messages import (
    parse,
    parse_validated,
    serialize,
    timestamp_from_ns,
    validate_command,
    validate_field_report,
    validate_packet,
    validate_policy_update,
    validate_seed_state,
)
from esper.leyline.settings import EsperSettings, StrictSettings, load_settings, resolve_signing_secret
from esper.leyline.signing import NonceLedger, SignatureVerifier, sign
from esper.leyline.wire import CONTRACT_VERSION, check_contract_version, guard_sqlite_contract

__all__ = [
    "CONTRACT_VERSION",
    "SYSTEM_CLOCK",
    "Backoff",
    "CleanupFailed",
    "CleanupStack",
    "EventSink",
    "Clock",
    "ConfigurationError",
    "ContractVersionMismatch",
    "ContractViolation",
    "DecisionDeadlineMissed",
    "EsperError",
    "EsperSettings",
    "FutureMessage",
    "MalformedMessage",
    "ManualClock",
    "NonceLedger",
    "ReplayDetected",
    "SignatureError",
    "SignatureInvalid",
    "SignatureVerifier",
    "StaleMessage",
    "StrictSettings",
    "SystemClock",
    "check_contract_version",
    "from_short_name",
    "guard_sqlite_contract",
    "load_settings",
    "parse",
    "parse_validated",
    "pb",
    "resolve_signing_secret",
    "serialize",
    "short_name",
    "value_label",
    "sign",
    "timestamp_from_ns",
    "validate_command",
    "validate_field_report",
    "validate_packet",
    "validate_policy_update",
    "validate_seed_state",
]
