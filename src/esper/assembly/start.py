"""What a run's start checks and undoes: a directory it can write, and what a failed start created."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from esper.leyline import ConfigurationError


class FreshStart:
    """What a fresh start creates in its run directory, so a start that fails before training (before
    config.json is written) can remove exactly that: the directory if it created it, else the new entries.
    """

    def __init__(self, run_dir: Path, started: Path) -> None:
        self.run_dir = run_dir
        self.started = started
        self.existed = run_dir.exists()
        self.before = set(run_dir.iterdir()) if self.existed else set()

    def undo(self) -> None:
        """Remove what this start created, unless the run began (then it is a run to resume)."""
        if self.started.exists() or not self.run_dir.exists():
            return
        if not self.existed:
            shutil.rmtree(self.run_dir)
            return
        for entry in set(self.run_dir.iterdir()) - self.before:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def require_writable(path: Path, what: str) -> None:
    """Refuse a directory the run could not create or write in (read-only, or under a file)."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigurationError(f"{what} {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigurationError(f"{what} {path}: {existing} is not writable")
