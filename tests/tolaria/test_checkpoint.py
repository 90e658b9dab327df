"""Checkpoint decoding: damaged files give a typed error, and resume falls back to the newest whole one."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from esper.tolaria import checkpoint as checkpoint_module
from esper.tolaria.checkpoint import (
    CheckpointError,
    CheckpointStore,
    NoValidCheckpoint,
    decode_record,
    decode_tensors,
)
from tests.integration.run_worker import assembled_run, config, controller

PATH = Path("ckpt-000000001.json")


def _store(tmp_path: Path) -> CheckpointStore:
    store = CheckpointStore(tmp_path / "checkpoints", keep=3)
    for step in (1, 2):
        store.save(step, {"w": torch.full((2,), float(step))}, {"step": step})
    store.flush()  # written on the store's writer thread
    return store


def _damage_json(store: CheckpointStore, step: int, text: str) -> None:
    (store.directory / f"ckpt-{step:09d}.json").write_text(text)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[]", "not a checkpoint record"),
        ("{broken", "not JSON"),
        ('{"step": 2, "tensors_file": "ckpt-000000002.safetensors", "tensors_sha256": "x"}', "lacks 'meta'"),
        (
            '{"step": 2, "tensors_file": "../x", "tensors_sha256": "x", "meta": {}}',
            "not a file name",
        ),
        ('{"step": "2", "tensors_file": "a", "tensors_sha256": "x", "meta": {}}', "'step' is a str"),
    ],
)
def test_damaged_newest_json_falls_back_to_the_older_checkpoint(
    tmp_path: Path, text: str, reason: str
) -> None:
    store = _store(tmp_path)
    _damage_json(store, 2, text)
    skipped: list[CheckpointError] = []
    checkpoint = store.latest(on_damaged=skipped.append)
    assert checkpoint is not None and checkpoint.step == 1
    assert [error.path.name for error in skipped] == ["ckpt-000000002.json"]
    assert reason in skipped[0].reason


def test_undecodable_tensors_fall_back_to_the_older_checkpoint(tmp_path: Path) -> None:
    store = _store(tmp_path)
    # A tensors file that is not safetensors, with a record whose hash matches it: only decoding can tell.
    blob = b"\x08\x00\x00\x00\x00\x00\x00\x00not json"
    (store.directory / "ckpt-000000002.safetensors").write_bytes(blob)
    record = json.loads((store.directory / "ckpt-000000002.json").read_text())
    record["tensors_sha256"] = hashlib.sha256(blob).hexdigest()
    _damage_json(store, 2, json.dumps(record))
    skipped: list[CheckpointError] = []
    checkpoint = store.latest(on_damaged=skipped.append)
    assert checkpoint is not None and checkpoint.step == 1
    assert "tensors do not decode" in skipped[0].reason


def test_every_checkpoint_damaged_is_a_typed_error_naming_each(tmp_path: Path) -> None:
    store = _store(tmp_path)
    _damage_json(store, 1, "[]")
    _damage_json(store, 2, "{}")
    with pytest.raises(NoValidCheckpoint) as caught:
        store.latest()
    assert [error.path.name for error in caught.value.damaged] == [
        "ckpt-000000002.json",
        "ckpt-000000001.json",
    ]


@given(st.binary(max_size=512))
def test_any_bytes_decode_as_a_record_or_give_the_typed_error(blob: bytes) -> None:
    try:
        record = decode_record(blob, PATH)
    except CheckpointError:
        return
    assert isinstance(record["meta"], dict) and isinstance(record["step"], int)


@given(
    st.one_of(
        st.binary(max_size=512),
        st.builds(
            lambda header, tail: len(header).to_bytes(8, "little") + header + tail,
            st.one_of(st.binary(max_size=128), st.text(max_size=128).map(str.encode)),
            st.binary(max_size=64),
        ),
    )
)
def test_any_bytes_decode_as_tensors_or_give_the_typed_error(blob: bytes) -> None:
    try:
        tensors = decode_tensors(blob, PATH)
    except CheckpointError:
        return
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["[]", "no meta", "meta lacks logs", "tensors"])
def test_resume_with_a_damaged_newest_checkpoint_uses_the_older_one(tmp_path: Path, damage: str) -> None:
    run_dir = tmp_path / "run"
    run_config = config(run_dir, epochs=2)
    assembled_run(run_config, controller())
    checkpoints = run_dir / "checkpoints"
    newest = sorted(checkpoints.glob("ckpt-*.json"))[-1]
    record = json.loads(newest.read_text())
    if damage == "[]":
        newest.write_text("[]")
    elif damage == "no meta":
        del record["meta"]
        newest.write_text(json.dumps(record))
    elif damage == "meta lacks logs":
        del record["meta"]["logs"]
        newest.write_text(json.dumps(record))
    else:
        tensors = checkpoints / record["tensors_file"]
        tensors.write_bytes(b"\xff" * 16)
        record["tensors_sha256"] = hashlib.sha256(tensors.read_bytes()).hexdigest()
        newest.write_text(json.dumps(record))
    summary = assembled_run(run_config, controller(), resume=True)
    older = sorted(checkpoints.glob("ckpt-*.json"))[0].name
    assert summary.resumed_from_step == int(older[5:14])
    assert summary.status == "completed"
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    damaged = [event for event in events if event["kind"] == "checkpoint_damaged"]
    assert len(damaged) == 1 and newest.stem in damaged[0]["reason"]  # the JSON or its tensors file


def test_resume_after_the_run_directory_moved_trains_in_the_new_place(tmp_path: Path) -> None:
    started = tmp_path / "A"
    assembled_run(config(started, epochs=1), controller())
    moved = tmp_path / "B"
    shutil.move(started, moved)
    # The caller's config names the new place; config.json still says A.
    from esper.assembly import resolve_config

    resolved = resolve_config(config(moved, epochs=1), resume=True)
    assert resolved.run_dir == moved
    summary = assembled_run(resolved, controller(), resume=True)
    assert summary.resumed_from_step is not None
    assert not started.exists()
    assert (moved / "summary.json").exists()


def test_a_checkpoint_is_written_off_the_training_thread_and_counts_only_when_flushed(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints")
    entered, release = threading.Event(), threading.Event()

    def before_commit() -> None:  # the logs' fsync, held here by the test
        entered.set()
        assert release.wait(30)

    store.save(5, {"w": torch.ones(2)}, {"step": 5}, before_commit=before_commit)
    assert entered.wait(30), "the writer thread never reached the commit"
    assert not (store.directory / "ckpt-000000005.json").exists(), "the caller waited for the write"
    release.set()
    assert store.steps() == [5]  # waits for the write in flight
    loaded = store.latest()
    assert loaded is not None and loaded.meta == {"step": 5}


def test_a_failed_background_write_raises_at_the_next_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(tmp_path / "checkpoints")

    def full_disk(path: Path, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "write_atomically", full_disk)
    store.save(3, {"w": torch.ones(2)}, {"step": 3})
    with pytest.raises(CheckpointError, match="No space left"):
        store.flush()
    store.flush()  # reported once, then the store is usable again
    monkeypatch.undo()
    store.save(4, {"w": torch.ones(2)}, {"step": 4})
    assert store.steps() == [4]


def test_meta_that_is_not_json_is_refused_by_the_caller(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints")
    with pytest.raises(CheckpointError, match="not JSON"):
        store.save(1, {"w": torch.ones(2)}, {"step": object()})


def test_on_durable_runs_once_the_checkpoint_counts_and_never_for_a_failed_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(tmp_path / "checkpoints")
    seen: list[list[int]] = []

    def on_durable() -> None:  # the checkpoint is whole and on disk when this runs
        seen.append(store._steps_on_disk())

    store.save(5, {"w": torch.ones(2)}, {"step": 5}, on_durable=on_durable)
    store.flush()
    assert seen == [[5]]

    monkeypatch.setattr(
        checkpoint_module, "write_atomically", lambda path, data: (_ for _ in ()).throw(OSError(28, "full"))
    )
    store.save(6, {"w": torch.ones(2)}, {"step": 6}, on_durable=on_durable)
    with pytest.raises(CheckpointError, match="full"):
        store.flush()
    assert seen == [[5]]


def test_a_failing_on_durable_is_raised_at_the_next_flush_and_the_checkpoint_stays(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints")

    def on_durable() -> None:
        raise RuntimeError("listener broke")

    store.save(7, {"w": torch.ones(2)}, {"step": 7}, on_durable=on_durable)
    with pytest.raises(CheckpointError, match="listener broke"):
        store.flush()
    assert store.steps() == [7]
