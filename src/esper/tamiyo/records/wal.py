"""The WAL high-water mark: acknowledged commits that SQLite's recovery dropped are found at open."""

from __future__ import annotations

import os
import struct
import zlib
from contextlib import suppress
from pathlib import Path

# WAL file header (https://sqlite.org/fileformat2.html#walformat): magic, version, page size, checkpoint
# sequence, salt-1, salt-2, checksum-1, checksum-2, all big-endian; each frame has a 24-byte header
# (page number, size of the database after a commit frame or 0, salts, checksums) and one page.
_WAL_HEADER = struct.Struct(">IIIIII")
_WAL_MAGIC_LE, _WAL_MAGIC_BE = 0x377F0682, 0x377F0683
_FRAME_HEADER = 24
# WAL-index header, the first 48 bytes of `-shm` (fileformat2, "WAL-index format"): version 3007000,
# isInit at 12, mxFrame (the last valid commit frame) at 16, the WAL's salts at 32, native byte order.
_SHM_VERSION_BYTES = struct.pack("=I", 3007000)
_SHM_U32 = struct.Struct("=I")
_MARK = struct.Struct(">8sII")  # salts, committed frames, CRC32 of the first 12 bytes
_MARK_BODY, _MARK_CRC = struct.Struct(">8sI"), struct.Struct(">I")


def wal_header_valid(header: bytes) -> bool:
    magic = int.from_bytes(header[:4], "big")
    if magic not in (_WAL_MAGIC_LE, _WAL_MAGIC_BE):
        return False
    words = struct.unpack((">" if magic == _WAL_MAGIC_BE else "<") + "6I", header[:24])
    s0 = s1 = 0
    for index in range(0, 6, 2):
        s0 = (s0 + words[index] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[index + 1] + s0) & 0xFFFFFFFF
    return header[24:32] == struct.pack(">II", s0, s1)


class WriteMark:
    """`<db>-mark`: the WAL generation (its salts) and its committed frame count after our last commit.

    Written with `pwrite` after the commit's fsync, never fsynced itself: a process crash keeps it (page
    cache), a power cut may lose its last update, and either way it can only lag the WAL, never lead it.
    """

    def __init__(self, db_path: Path) -> None:
        self.path = Path(f"{db_path}-mark")
        self.wal = Path(f"{db_path}-wal")
        self._shm = Path(f"{db_path}-shm")
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self._shm_fd: int | None = None

    def close(self) -> None:
        self.forget_wal_index()
        with suppress(OSError):
            os.close(self._fd)

    def forget_wal_index(self) -> None:
        """Reopen `-shm` on next use (it is recreated when the last connection to the database closes)."""
        if self._shm_fd is not None:
            with suppress(OSError):
                os.close(self._shm_fd)
            self._shm_fd = None

    def read(self) -> tuple[bytes, int] | None:
        """The last mark written, or None (none yet, or unreadable: then there is nothing to compare)."""
        data = os.pread(self._fd, _MARK.size, 0)
        if len(data) != _MARK.size:
            return None
        salts, frames, crc = _MARK.unpack(data)
        return (salts, frames) if zlib.crc32(data[:12]) == crc else None

    def committed(self) -> tuple[bytes, int] | None:
        """(salts, mxFrame) of the WAL-index header: what SQLite holds as committed right now."""
        if self._shm_fd is None:
            try:
                self._shm_fd = os.open(self._shm, os.O_RDONLY)
            except FileNotFoundError:
                return None
        head = os.pread(self._shm_fd, 48, 0)
        if head[:4] != _SHM_VERSION_BYTES or len(head) < 48 or not head[12]:
            return None
        return head[32:40], _SHM_U32.unpack_from(head, 16)[0]

    def advance(self) -> None:
        """Note the WAL's committed frames (called after each commit, under the store's lock)."""
        state = self.committed()
        if state is not None:
            body = _MARK_BODY.pack(*state)
            os.pwrite(self._fd, body + _MARK_CRC.pack(zlib.crc32(body)), 0)

    def lost(self) -> tuple[int, str] | None:
        """Acknowledged commits that recovery did not find, with what was seen; None when none are missing.

        Called at open inside a read transaction (no writer can restart the WAL meanwhile), after SQLite's
        recovery and before anything is written (a write would overwrite the damaged tail).
        """
        mark = self.read()
        if mark is None or not self.wal.exists():
            return None
        salts, acknowledged = mark
        with self.wal.open("rb") as wal:
            header = wal.read(32)
            if len(header) < 32:
                return None  # truncated by a checkpoint: every frame is in the database
            if not wal_header_valid(header):
                return max(acknowledged, 1), "the WAL header fails its checksum: SQLite ignores the whole WAL"
            if header[16:24] != salts:
                return None  # the WAL restarted after a complete checkpoint: the marked frames are in the db
            state = self.committed()
            if state is None or state[0] != salts or state[1] >= acknowledged:
                return None
            recovered = state[1]
            page = _WAL_HEADER.unpack(header[:24])[2]
            commits = 0
            for frame in range(recovered + 1, acknowledged + 1):
                wal.seek(32 + (frame - 1) * (_FRAME_HEADER + page))
                frame_header = wal.read(8)
                commits += len(frame_header) == 8 and frame_header[4:8] != b"\0\0\0\0"
        detail = f"frames {recovered + 1}-{acknowledged} of the WAL were committed and are not valid now"
        return max(commits, 1), detail
