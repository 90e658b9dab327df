"""Simic's policy file is replaced whole and durably: a failed write leaves the old policy readable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from esper.simic.trainer import SimicState


def test_a_failed_policy_write_leaves_the_old_policy_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = SimicState(tmp_path / "simic")
    state.save_policy(b"old policy")

    def fsync_fails(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync_fails)
    with pytest.raises(OSError, match="Input/output error"):
        state.save_policy(b"new policy")  # not durable, so not in place
    monkeypatch.undo()
    assert state.policy_path.read_bytes() == b"old policy"
    assert sorted(path.name for path in state.root.iterdir()) == ["policy.safetensors"]
    state.save_policy(b"new policy")
    assert state.policy_path.read_bytes() == b"new policy"
