"""Durable file writes every subsystem needs: replace a file whole, and make the replacement survive a
crash."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    """Make a rename inside `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file or the whole new one, never a part: a
    temporary file beside it, fsynced, renamed over it, the rename fsynced. A failed write leaves the old
    file and no temporary behind."""
    replace_synced(path, data)
    fsync_directory(path.parent)


def replace_synced(path: Path, data: bytes) -> None:
    """`write_atomically` without the directory's fsync: the data is durable, the rename not yet. For a
    caller that renames several files into one directory and fsyncs it once, after the last (a crash
    before that fsync may keep any subset of the renames)."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
