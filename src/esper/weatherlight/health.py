"""The health file: every service's state, rewritten atomically on every change; `esper serve --status`
shows it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from esper.leyline import EsperError
from esper.leyline.files import write_atomically

HEALTH_VERSION = 1


class ServiceState(StrEnum):
    """Where a supervised service stands."""

    RUNNING = "running"
    RESTARTING = "restarting"
    GIVEN_UP = "given_up"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(frozen=True)
class ServiceHealth:
    """One service in the health file. `last_change` and `next_start_at` are UTC ISO-8601 times."""

    name: str
    state: ServiceState
    pid: int | None
    restarts: int
    last_exit_code: int | None
    last_change: str
    reason: str
    next_start_at: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the state as its value)."""
        record = asdict(self)
        record["state"] = self.state.value
        return record


class HealthFileError(EsperError):
    """The health file is missing or is not a health file of this version."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"health file {path}: {reason}")


def iso_time(wall_ns: int) -> str:
    """A wall-clock time in nanoseconds as UTC ISO-8601 (millisecond precision)."""
    return datetime.fromtimestamp(wall_ns / 1e9, tz=UTC).isoformat(timespec="milliseconds")


def write_health(
    path: Path, *, supervisor_pid: int, supervisor_state: str, updated_at: str, services: list[ServiceHealth]
) -> None:
    """Write the health file atomically: a temporary file in the same directory, fsynced, then renamed,
    so a reader sees the previous or the new state, never half of one."""
    document = {
        "version": HEALTH_VERSION,
        "supervisor": {"pid": supervisor_pid, "state": supervisor_state, "updated_at": updated_at},
        "services": [service.to_json() for service in services],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, (json.dumps(document, indent=2) + "\n").encode())


def read_health(path: Path) -> dict[str, Any]:
    """The health document at `path`; raises `HealthFileError` when missing or malformed."""
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise HealthFileError(
            path, "does not exist (has `esper serve` run with this data directory?)"
        ) from exc
    except (OSError, ValueError) as exc:
        raise HealthFileError(path, f"unreadable: {exc}") from exc
    if not isinstance(document, dict) or document.get("version") != HEALTH_VERSION:
        raise HealthFileError(path, f"not a version {HEALTH_VERSION} health file")
    if not isinstance(document.get("supervisor"), dict) or not isinstance(document.get("services"), list):
        raise HealthFileError(path, "lacks the supervisor or services section")
    return document
