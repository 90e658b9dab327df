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


def test_simic_loads_its_policy_at_the_deployments_size_and_refuses_another(tmp_path: Path) -> None:
    """Simic trains Tamiyo's own policy class at TAMIYO_POLICY_SIZE: a saved policy of another size is
    refused with the setting that loads it, never loaded into a network of the wrong shape."""
    import json

    from safetensors.torch import load as load_safetensors
    from safetensors.torch import save as save_safetensors

    from esper.tamiyo.model.checkpoint import CheckpointIncompatible, read_safetensors_header
    from esper.tamiyo.model.policy import GNNPolicy
    from esper.tamiyo.settings import TamiyoSettings

    full = TamiyoSettings(policy_size="full")
    payload = GNNPolicy(full, seed=1).state_bytes()
    header = read_safetensors_header(payload) | {"sequence": "3"}
    state = SimicState(tmp_path / "simic")
    state.save_policy(save_safetensors(load_safetensors(payload), metadata={"header": json.dumps(header)}))
    with pytest.raises(CheckpointIncompatible, match="set TAMIYO_POLICY_SIZE=full"):
        state.load_policy(TamiyoSettings())
    saved = state.load_policy(full)
    assert saved is not None
    policy, sequence = saved
    assert policy.config.size == "full" and sequence == 3
    assert policy.version == GNNPolicy(full, seed=1).version
