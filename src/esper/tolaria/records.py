"""What a trainer writes into its run directory: three JSON-lines logs (metrics, decisions, events) and
its checkpoints. The logs and the paths are handed in by the run assembly (Nissa owns the layout and the
log files); Tolaria spells no file name of its own.

A checkpoint records each log's size; resuming truncates the logs back to it, so a resumed run's logs
read as if it had never stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


class RunLog(Protocol):
    """An append-only log of JSON records (Nissa's `JsonlLog` is one)."""

    def append(self, record: dict[str, Any]) -> None:
        """Append one record (flushed to the OS)."""
        ...

    def size(self) -> int:
        """Bytes written so far."""
        ...

    def sync(self) -> None:
        """Make what was appended durable."""
        ...

    def truncate(self, size: int) -> None:
        """Cut the log back to `size` bytes."""
        ...

    def close(self) -> None:
        """Close the log."""
        ...


@dataclass
class RunDirectory:
    """The logs and the checkpoint directory of one run."""

    metrics: RunLog
    decisions: RunLog
    events: RunLog
    checkpoint_dir: Path

    def logs(self) -> dict[str, RunLog]:
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

    def close(self) -> None:
        """Close every log."""
        for log in self.logs().values():
            log.close()
