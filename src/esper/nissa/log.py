"""The run's JSON-lines logs (metrics, decisions, events), each kept open for the whole run.

One `open` per log per run, one line per record, flushed to the OS as it is written (a crash loses no
line that was appended); `sync` makes them durable before a checkpoint records their sizes, and
`truncate` cuts a log back to such a size on resume. The event log is also an `EventSink`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any

from esper.leyline.files import write_atomically


class JsonlLog:
    """An append-only JSON-lines file, open from construction to `close`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by `close`)

    def append(self, record: dict[str, Any]) -> None:
        """Append one record and flush it to the OS."""
        self._handle.write(json.dumps(record, sort_keys=True) + "\n")
        self._handle.flush()

    def size(self) -> int:
        """Bytes written so far."""
        return os.fstat(self._handle.fileno()).st_size

    def sync(self) -> None:
        """fsync the file (before a checkpoint records its size)."""
        os.fsync(self._handle.fileno())

    def truncate(self, size: int) -> None:
        """Cut the log back to `size` bytes (what a checkpoint recorded); appends go on from there."""
        self._handle.flush()
        os.truncate(self._handle.fileno(), size)

    def read(self) -> list[dict[str, Any]]:
        """Every record (for readers of a finished log; a run never reads its own logs back)."""
        with open(self.path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]

    def close(self) -> None:
        """Close the file (idempotent)."""
        self._handle.close()


class EventLog(JsonlLog):
    """The run's event log, which is also an `EventSink`: `log(name, description, **attributes)` appends
    `{"kind": name, "reason": description, **attributes}`."""

    def __call__(self, name: str, description: str, /, **attributes: str) -> None:
        self.append({"kind": name, "reason": description, **attributes})


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write a run's JSON document (config, summary) atomically."""
    write_atomically(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
