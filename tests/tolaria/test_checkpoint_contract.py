"""Checkpoints record the Leyline contract version; one of another version is refused, not misread."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from esper.leyline import CONTRACT_VERSION, ContractVersionMismatch
from esper.tolaria.checkpoint import CheckpointStore


def test_a_checkpoint_records_the_contract_version_and_loads(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    json_path = store.save(3, {"w": torch.ones(2)}, {"k": 1})
    store.flush()  # written on the store's writer thread
    assert json.loads(json_path.read_text())["leyline_contract"] == CONTRACT_VERSION
    assert store.load(3).meta == {"k": 1}


def test_a_checkpoint_of_the_first_contract_is_refused_even_as_the_latest(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    json_path = store.save(3, {"w": torch.ones(2)}, {"k": 1})
    store.flush()  # written on the store's writer thread
    record = json.loads(json_path.read_text())
    del record["leyline_contract"]  # as written before the contract version was recorded
    json_path.write_text(json.dumps(record))
    with pytest.raises(ContractVersionMismatch) as info:
        store.latest()
    assert (info.value.found, info.value.expected) == (1, CONTRACT_VERSION)
