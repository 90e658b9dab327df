"""RUN_DIR/status.json: whether a run is running, completed, failed or halted, and why.

Written atomically "running" when training starts and once more when it ends, so a reader (`esper runs`,
`esper watch`) never sees half a file, and a failed run never looks like a finished one.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from esper.leyline.files import write_atomically

RunState = Literal["running", "completed", "failed", "halted"]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class RunStatus:
    """The document of status.json (the contract readers rely on)."""

    status: RunState
    reason: str | None
    started_at: str
    finished_at: str | None
    pid: int
    command: str

    @classmethod
    def running(cls, command: str) -> RunStatus:
        """A run that starts now, in this process."""
        return cls("running", None, _now(), None, os.getpid(), command)

    def ended(self, status: RunState, reason: str | None = None) -> RunStatus:
        """The same run, ended now with `status` (and why, for a failure or a halt)."""
        return replace(self, status=status, reason=reason, finished_at=_now())

    def write(self, path: Path) -> None:
        """Replace `path` with this status, atomically."""
        write_atomically(path, (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode())


def read_status(path: Path) -> RunStatus:
    """The status written at `path` (OSError / ValueError / KeyError when it is absent or not one)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return RunStatus(
        status=data["status"],
        reason=data["reason"],
        started_at=str(data["started_at"]),
        finished_at=data["finished_at"],
        pid=int(data["pid"]),
        command=str(data["command"]),
    )
