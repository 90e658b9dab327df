"""The run directory: resolved config, JSONL logs (metrics, decisions, events), checkpoints, summary.

JSONL logs are appended line by line and flushed. A checkpoint records each log's size; resuming
truncates the logs back to it, so a resumed run's logs read as if it had never stopped.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esper.leyline.files import write_atomically


class JsonlLog:
    """An append-only JSON-lines file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.touch(exist_ok=True)

    def append(self, record: dict[str, Any]) -> None:
        """Append one record and flush it to the OS."""
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")

    def size(self) -> int:
        """Bytes written so far."""
        return self.path.stat().st_size

    def sync(self) -> None:
        """fsync the file (before a checkpoint records its size)."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def truncate(self, size: int) -> None:
        """Cut the log back to `size` bytes (what a checkpoint recorded)."""
        with open(self.path, "r+b") as handle:
            handle.truncate(size)

    def read(self) -> list[dict[str, Any]]:
        """Every record."""
        with open(self.path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]


@dataclass
class RunDirectory:
    """Paths and logs of one run."""

    root: Path

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.metrics = JsonlLog(self.root / "metrics.jsonl")
        self.decisions = JsonlLog(self.root / "decisions.jsonl")
        self.events = JsonlLog(self.root / "events.jsonl")

    @property
    def config_path(self) -> Path:
        """The resolved configuration."""
        return self.root / "config.json"

    @property
    def summary_path(self) -> Path:
        """The run's summary."""
        return self.root / "summary.json"

    @property
    def checkpoint_dir(self) -> Path:
        """Where checkpoints live."""
        return self.root / "checkpoints"

    def logs(self) -> dict[str, JsonlLog]:
        """The JSONL logs by name."""
        return {"metrics": self.metrics, "decisions": self.decisions, "events": self.events}

    def log_sizes(self) -> dict[str, int]:
        """Every log's size now (a checkpoint records them; `sync_logs` makes them durable)."""
        return {name: log.size() for name, log in self.logs().items()}

    def sync_logs(self) -> None:
        """fsync every log (before a checkpoint that records their sizes counts)."""
        for log in self.logs().values():
            log.sync()

    def truncate_logs(self, sizes: dict[str, int]) -> None:
        """Cut every log back to the sizes a checkpoint recorded."""
        for name, log in self.logs().items():
            log.truncate(int(sizes[name]))

    def write_json(self, path: Path, data: dict[str, Any]) -> None:
        """Write a JSON document atomically."""
        write_atomically(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())

    def read_json(self, path: Path) -> dict[str, Any]:
        """Read a JSON document."""
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return data
