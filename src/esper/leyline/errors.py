"""Typed errors shared by every subsystem.

Every Esper error derives from `EsperError`, so a composition root can tell our failures from bugs.
Errors carry their context as attributes and name it in their message.
"""

from __future__ import annotations


class EsperError(Exception):
    """Base of every error Esper raises on purpose."""


class ContractViolation(EsperError):
    """A message does not satisfy its contract (a required field is missing or out of range)."""

    def __init__(self, message_type: str, field: str, reason: str) -> None:
        self.message_type = message_type
        self.field = field
        self.reason = reason
        super().__init__(f"{message_type}.{field}: {reason}")


class MalformedMessage(EsperError):
    """Bytes that do not parse as the expected message."""

    def __init__(self, message_type: str, reason: str) -> None:
        self.message_type = message_type
        self.reason = reason
        super().__init__(f"malformed {message_type}: {reason}")


class SignatureError(EsperError):
    """A signed message failed verification; `reason` is a short machine-readable code."""

    reason = "signature_error"

    def __init__(self, message_type: str, detail: str) -> None:
        self.message_type = message_type
        self.detail = detail
        super().__init__(f"{message_type} rejected ({self.reason}): {detail}")


class SignatureInvalid(SignatureError):
    """The HMAC does not match: forged, tampered with, or signed with another key."""

    reason = "invalid_signature"


class ReplayDetected(SignatureError):
    """The nonce was seen before within its time-to-live."""

    reason = "replayed_nonce"


class StaleMessage(SignatureError):
    """The message was issued longer ago than the freshness window allows."""

    reason = "stale"


class FutureMessage(SignatureError):
    """The message claims to be issued further in the future than clock skew allows."""

    reason = "future_dated"


class ConfigurationError(EsperError):
    """Configuration that cannot be used; raised at start, naming the setting."""


class DecisionDeadlineMissed(EsperError):
    """A controller's decision was not back within its step budget: no command, its late result discarded.

    Here so that a trainer can tell a late decision from a failed one without importing its controller."""


class ContractVersionMismatch(EsperError):
    """Stored Leyline messages were written under another contract version (another field numbering)."""

    def __init__(self, where: str, found: int, expected: int) -> None:
        self.where = where
        self.found = found
        self.expected = expected
        super().__init__(
            f"{where} holds Leyline messages of contract version {found}; this Esper reads version "
            f"{expected} only (the field numbering changed, so the bytes would be misread): "
            "start from an empty store or drain it with the Esper that wrote it"
        )
