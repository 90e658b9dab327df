"""`write_atomically`: the old file or the whole new one, and no temporary left after a failure."""

from __future__ import annotations

from pathlib import Path

import pytest

from esper.leyline.files import write_atomically


def test_a_write_replaces_the_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_atomically(path, b"old")
    write_atomically(path, b"new")
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_failed_write_leaves_no_temporary_behind(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.mkdir()  # a directory cannot be replaced by a file: the rename fails
    (target / "keep").write_text("old")
    with pytest.raises(OSError):
        write_atomically(target, b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert (target / "keep").read_text() == "old"
