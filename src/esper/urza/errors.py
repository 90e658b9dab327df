"""Urza's typed errors: each names the blueprint (or the file) and why."""

from __future__ import annotations

from pathlib import Path

from esper.leyline import EsperError


class UrzaError(EsperError):
    """Base of the catalogue's errors."""


class UnknownBlueprint(UrzaError):
    """No blueprint with this id is in the catalogue (or no module factory is registered for it)."""

    def __init__(self, blueprint_id: str, reason: str = "not in the catalogue") -> None:
        self.blueprint_id = blueprint_id
        self.reason = reason
        super().__init__(f"unknown blueprint {blueprint_id!r}: {reason}")


class BlueprintNotApplicable(UrzaError):
    """The blueprint cannot be built for this kind, width or these parameters."""

    def __init__(self, blueprint_id: str, reason: str) -> None:
        self.blueprint_id = blueprint_id
        self.reason = reason
        super().__init__(f"blueprint {blueprint_id!r} is not applicable: {reason}")


class BlueprintQuarantined(UrzaError):
    """The blueprint is quarantined: it is listed but must not be built."""

    def __init__(self, blueprint_id: str, reason: str) -> None:
        self.blueprint_id = blueprint_id
        self.reason = reason
        super().__init__(f"blueprint {blueprint_id!r} is quarantined: {reason}")


class DuplicateBlueprint(UrzaError):
    """`add` was given an id the catalogue already holds (use `update`)."""

    def __init__(self, blueprint_id: str) -> None:
        self.blueprint_id = blueprint_id
        super().__init__(f"blueprint {blueprint_id!r} is already in the catalogue")


class InvalidDescriptor(UrzaError):
    """A descriptor handed to `add` or `update` breaks the catalogue's rules."""

    def __init__(self, blueprint_id: str, field: str, reason: str) -> None:
        self.blueprint_id = blueprint_id
        self.field = field
        self.reason = reason
        super().__init__(f"blueprint {blueprint_id!r}: {field} {reason}")


class CatalogueCorrupt(UrzaError):
    """The catalogue file cannot be read as a catalogue (not SQLite, damaged, or undecodable rows)."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"blueprint catalogue {path} is corrupt: {reason}")


class ListenerFailed(UrzaError):
    """A change was committed, but one or more of its listeners raised (the first is the cause)."""

    def __init__(self, blueprint_id: str, revision: int, errors: list[BaseException]) -> None:
        self.blueprint_id = blueprint_id
        self.revision = revision
        self.errors = errors
        names = ", ".join(f"{type(error).__name__}: {error}" for error in errors)
        super().__init__(
            f"change of {blueprint_id!r} at revision {revision} was committed, "
            f"but {len(errors)} listener(s) failed: {names}"
        )


class NotificationFailed(UrzaError):
    """A change was committed, but its notification could not be published on the bus yet.

    Nothing is lost: the notification stays in the catalogue's outbox (`pending` of them) and is
    published by the next change or by `publish_pending()`, from this process or any other.
    """

    def __init__(self, revision: int, pending: int, cause: BaseException) -> None:
        self.revision = revision
        self.pending = pending
        self.cause = cause
        super().__init__(
            f"catalogue revision {revision} is committed, but {pending} change notification(s) could not be "
            f"published (they stay in the outbox): {type(cause).__name__}: {cause}"
        )


class CatalogueTimeout(UrzaError):
    """A read of the catalogue did not finish within its deadline (another writer held it, or it is slow)."""

    def __init__(self, path: Path, blueprint_id: str, timeout_ms: float) -> None:
        self.path = path
        self.blueprint_id = blueprint_id
        self.timeout_ms = timeout_ms
        super().__init__(f"reading {blueprint_id!r} from {path} took longer than {timeout_ms:g} ms")
