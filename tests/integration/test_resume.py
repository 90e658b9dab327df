"""A run killed with SIGKILL and resumed ends in the same state as an uninterrupted run (slow)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from esper.leyline import pb
from tests.integration.run_worker import assembled_run, config, controller

REPO = Path(__file__).resolve().parents[2]


def _worker(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tests.integration.run_worker", str(run_dir), *extra]


def _final_checkpoint(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    checkpoints = sorted((run_dir / "checkpoints").glob("ckpt-*.json"))
    record = json.loads(checkpoints[-1].read_text())
    tensors = load_file(run_dir / "checkpoints" / record["tensors_file"])
    return tensors, record["meta"]


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["scripted", "gnn"])
def test_kill_and_resume_equals_uninterrupted_run(tmp_path: Path, policy: str) -> None:
    """The GNN samples its choices and normalises its features with running statistics: both (and the
    weights' version) come back from the checkpoint, so the resumed run decides as the uninterrupted one."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    chosen = ("--policy", policy)
    reference = tmp_path / "reference" / "run"
    subprocess.run(_worker(reference, *chosen), cwd=REPO, env=env, check=True, timeout=300)

    interrupted = tmp_path / "interrupted" / "run"
    # The delay per decision keeps the run going long enough to be killed mid-way (the narrow host that
    # runs start from trains fast).
    process = subprocess.Popen(_worker(interrupted, "--delay", "0.2", *chosen), cwd=REPO, env=env)
    checkpoints = interrupted / "checkpoints"
    deadline = time.monotonic() + 90
    killed_after: list[str] = []
    while time.monotonic() < deadline and process.poll() is None:
        done = sorted(p.name for p in checkpoints.glob("ckpt-*.json")) if checkpoints.exists() else []
        # Kill once a mid-run checkpoint (after some seeds have germinated) is on disk.
        if any(name >= "ckpt-000000069.json" for name in done):
            os.kill(process.pid, signal.SIGKILL)
            killed_after = done
            break
        time.sleep(0.02)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (interrupted / "summary.json").exists()
    assert killed_after

    subprocess.run(_worker(interrupted, "--resume", *chosen), cwd=REPO, env=env, check=True, timeout=300)

    summary = json.loads((interrupted / "summary.json").read_text())
    expected = json.loads((reference / "summary.json").read_text())
    assert summary["resumed_from_step"] is not None and summary["resumed_from_step"] > 0
    for key in ("final_val_accuracy", "final_val_loss", "params_final", "seeds_fossilized", "transitions"):
        assert summary[key] == expected[key], key
    tensors, meta = _final_checkpoint(interrupted)
    reference_tensors, reference_meta = _final_checkpoint(reference)
    assert tensors.keys() == reference_tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(tensor, reference_tensors[name]), name
    assert meta["manager"] == reference_meta["manager"]
    assert meta["controller"] == reference_meta["controller"]
    for log in ("events.jsonl", "metrics.jsonl"):
        assert _without_ids(interrupted / log) == _without_ids(reference / log), log


def _without_ids(log: Path) -> list[dict[str, Any]]:
    """The log's records without command ids, in the record or its detail (Tamiyo's are random; the
    scripted controller's are not)."""
    records = [json.loads(line) for line in log.read_text().splitlines()]
    for record in records:
        if isinstance(record.get("detail"), dict):
            record["detail"] = {k: v for k, v in record["detail"].items() if k != "command_id"}
    return [{k: v for k, v in record.items() if k != "command_id"} for record in records]


class _Replaying:
    """The scripted controller, recording its commands; after `replay(...)` its next decision returns
    that old command instead (a replay of something Kasmina already applied)."""

    def __init__(self) -> None:
        self.inner = controller()
        self.issued: list[pb.AdaptationCommand] = []
        self.replay: pb.AdaptationCommand | None = None
        self.submitted = pb.AdaptationCommand()

    def prepare(self, packet: pb.SystemStatePacket) -> None:
        self.inner.prepare(packet)

    def anticipate(self) -> None:
        self.inner.anticipate()

    def evaluate_step(self, packet: pb.SystemStatePacket) -> pb.AdaptationCommand:
        if self.replay is not None:
            command, self.replay = self.replay, None
            return command
        command = self.inner.evaluate_step(packet)
        self.issued.append(command)
        return command

    def submit(self, packet: pb.SystemStatePacket) -> None:
        self.submitted = self.evaluate_step(packet)

    def collect(self) -> pb.AdaptationCommand:
        return self.submitted

    def export_state(self) -> dict[str, Any]:
        return self.inner.export_state()

    def restore_state(self, state: Mapping[str, Any]) -> None:
        self.inner.restore_state(state)

    def checkpointed(self, training_run_id: str, step: int) -> None:
        self.inner.checkpointed(training_run_id, step)

    def rewound(self, training_run_id: str, step: int) -> None:
        self.inner.rewound(training_run_id, step)


def _first_applied_command(run_dir: Path) -> pb.AdaptationCommand:
    """Run one epoch; the first command Kasmina accepted in it."""
    first = _Replaying()
    assembled_run(config(run_dir, epochs=1), first)
    applied = [
        json.loads(line)
        for line in (run_dir / "decisions.jsonl").read_text().splitlines()
        if json.loads(line).get("accepted")
    ]
    assert applied, "the first epoch applied no command"
    return next(c for c in first.issued if c.command_id == applied[0]["command_id"])


def _replayed_after_resume(run_dir: Path, command: pb.AdaptationCommand) -> dict[str, Any]:
    """A new process (a new verifier, a new ledger) resumes the run for a second epoch; its first
    decision hands Kasmina `command` again, well inside the freshness window. Returns that record."""
    second = _Replaying()
    second.replay = command
    assembled_run(config(run_dir, epochs=2), second, resume=True)
    records = [json.loads(line) for line in (run_dir / "decisions.jsonl").read_text().splitlines()]
    again = [r for r in records if r.get("command_id") == command.command_id]
    assert len(again) == 2
    return again[1]


def test_a_command_applied_before_the_checkpoint_is_refused_as_a_replay_after_resume(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    replayed = _replayed_after_resume(run_dir, _first_applied_command(run_dir))
    assert replayed["accepted"] is False
    assert replayed["rejection"] == "replayed_nonce"


def test_a_command_missing_from_the_saved_ledger_is_refused_after_resume(tmp_path: Path) -> None:
    """A command applied after the last checkpoint is not in the ledger that checkpoint saved (the
    crash came first); replayed into the resumed run within the freshness window, it is refused all the
    same, as a command of an earlier life of the run."""
    run_dir = tmp_path / "run"
    command = _first_applied_command(run_dir)
    # As if the crash came before any checkpoint recorded this command's nonce.
    for path in (run_dir / "checkpoints").glob("ckpt-*.json"):
        record = json.loads(path.read_text())
        record["meta"]["nonces"] = []
        path.write_text(json.dumps(record, sort_keys=True))
    replayed = _replayed_after_resume(run_dir, command)
    assert replayed["accepted"] is False
    assert replayed["rejection"] == "stale"
    assert "earlier life" in replayed["detail"]
