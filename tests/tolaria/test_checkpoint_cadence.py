"""When the trainer checkpoints: at the start, right after every structural change, every
`checkpoint_interval_s` of training, at the end; a crash at any point resumes to the uninterrupted run."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from esper.leyline import SYSTEM_CLOCK, pb
from esper.tolaria.data import Dataset
from esper.tolaria.trainer import Trainer, TrainingOutcome
from esper.urza import BlueprintCatalogue
from tests.tolaria.support import assert_same_run, growth_trainer

torch.set_num_threads(1)
NEVER = 86_400.0  # no checkpoint by the clock within a test
STRUCTURAL = {"GERMINATED", "FOSSILIZED", "CULLED"}


class StepClock:
    """Real wall time (commands are checked for freshness against it); a monotonic clock that moves one
    second per training step, so that the wall-clock cadence is exact."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wall_ns(self) -> int:
        return SYSTEM_CLOCK.wall_ns()

    def monotonic(self) -> float:
        return self.seconds


def make_trainer(
    run_dir: Path,
    dataset: Dataset,
    catalogue: BlueprintCatalogue,
    *,
    interval_s: float = NEVER,
    operation: int = pb.SEED_OP_WIDEN,
) -> tuple[Trainer, list[int], list[int]]:
    """A growing run (a WIDEN germinated, its statistics gathered, fossilised and merged) with every
    checkpoint kept; returns it with the list that collects the steps of its structural changes and the
    list that collects the steps at which it checkpoints."""
    clock = StepClock()
    trainer = growth_trainer(
        run_dir,
        dataset,
        catalogue,
        operation,
        clock=clock,
        checkpoint_interval_s=interval_s,
        keep_checkpoints=1000,
    )
    manager = trainer.manager
    changes: list[int] = []
    drain = manager.drain_parameter_changes

    def noted() -> Any:
        drained = drain()
        if drained:
            changes.append(trainer.step)
        return drained

    manager.drain_parameter_changes = noted  # type: ignore[method-assign]
    checkpoints: list[int] = []
    save = trainer.save_checkpoint

    def saved() -> None:
        assert trainer._in_flight is None, "a checkpoint with a decision in flight"
        checkpoints.append(trainer.step)
        save()

    trainer.save_checkpoint = saved  # type: ignore[method-assign]
    train_step = trainer.train_step

    def step() -> None:
        train_step()
        clock.seconds += 1.0

    trainer.train_step = step  # type: ignore[method-assign]
    return trainer, changes, checkpoints


def _same_run(
    resumed: Trainer, outcome: TrainingOutcome, reference: Trainer, expected: TrainingOutcome
) -> None:
    assert_same_run(resumed, outcome, reference, expected)
    assert _transitions(resumed) == _transitions(reference)


def _transitions(trainer: Trainer) -> list[tuple[int, str, str]]:
    return [
        (e["step"], e["slot_id"], e["to_stage"])
        for e in trainer.run_dir.events.read()
        if e["kind"] == "transition"
    ]


def _crashed_copy(reference: Path, into: Path, after_step: int) -> Path:
    """The run directory as a crash after the checkpoint of `after_step` leaves it: logs written on,
    no newer checkpoint."""
    shutil.copytree(reference, into)
    for path in (into / "checkpoints").iterdir():
        if int(path.name.split("-")[1].split(".")[0]) > after_step:
            path.unlink()
    return into


@pytest.mark.parametrize("operation", [pb.SEED_OP_WIDEN, pb.SEED_OP_DEEPEN])
def test_a_crash_after_any_structural_change_resumes_to_the_uninterrupted_run(
    tmp_path: Path, dataset: Dataset, catalogue: BlueprintCatalogue, operation: int
) -> None:
    reference, changes, checkpoints = make_trainer(
        tmp_path / "reference", dataset, catalogue, operation=operation
    )
    expected = reference.fit()
    # germinated, parameters added, fossilised (and merged, for a WIDEN): each is checkpointed at the first
    # step after it with no decision in flight (at most the lag later); nothing else is, but the start and
    # the end
    stages = [step for step, _, stage in _transitions(reference) if stage in STRUCTURAL]
    assert len(stages) >= 2, _transitions(reference)
    changes = sorted(set(changes) | set(stages))
    lag = reference.settings.decision_lag_steps
    for change in changes:
        assert any(change <= step <= change + 1 + lag for step in checkpoints), (change, checkpoints)
    assert checkpoints[0] == 0 and checkpoints[-1] == reference.total_steps
    assert len(checkpoints) <= len(changes) + 2
    for step in checkpoints[1:-1]:
        run = _crashed_copy(tmp_path / "reference", tmp_path / f"crashed-{step}", step)
        resumed, _, _ = make_trainer(run, dataset, catalogue, operation=operation)
        assert resumed.resume() and resumed.step == step
        _same_run(resumed, resumed.fit(), reference, expected)


def test_checkpoints_by_the_clock_never_change_what_the_run_does_and_resume_exactly(
    tmp_path: Path, dataset: Dataset, catalogue: BlueprintCatalogue
) -> None:
    reference, _, sparse = make_trainer(tmp_path / "reference", dataset, catalogue)
    expected = reference.fit()
    clocked, _, checkpoints = make_trainer(tmp_path / "clocked", dataset, catalogue, interval_s=7.0)
    _same_run(clocked, clocked.fit(), reference, expected)
    periodic = sorted(set(checkpoints) - set(sparse))
    assert len(periodic) >= 5, checkpoints
    for earlier, later in itertools.pairwise(checkpoints):
        # one step later than 7 s when a decision was in flight at the 7th
        assert later - earlier <= 8, checkpoints
    middle = periodic[len(periodic) // 2]
    run = _crashed_copy(tmp_path / "clocked", tmp_path / "crashed", middle)
    resumed, _, _ = make_trainer(run, dataset, catalogue, interval_s=7.0)
    assert resumed.resume() and resumed.step == middle
    _same_run(resumed, resumed.fit(), reference, expected)


@pytest.mark.parametrize("lost", ["tensors renamed", "tensors written", "json written"])
def test_a_crash_before_the_directory_fsync_resumes_from_the_checkpoint_before(
    tmp_path: Path, dataset: Dataset, catalogue: BlueprintCatalogue, lost: str
) -> None:
    """One directory fsync covers both renames of a checkpoint: a crash before it may keep the JSON's
    rename and lose the tensors file's, or lose the tensors file or the JSON altogether. Each resumes
    from the checkpoint before it (reported when a damaged one is skipped) and ends as the run would."""
    reference, _, checkpoints = make_trainer(tmp_path / "reference", dataset, catalogue)
    expected = reference.fit()
    newest, previous = checkpoints[-2], checkpoints[-3]
    run = _crashed_copy(tmp_path / "reference", tmp_path / "crashed", newest)
    directory = run / "checkpoints"
    tensors = directory / f"ckpt-{newest:09d}.safetensors"
    record = directory / f"ckpt-{newest:09d}.json"
    if lost == "tensors renamed":  # the JSON's rename reached the disk, the tensors file's did not
        tensors.rename(directory / f".{tensors.name}.tmp")
    elif lost == "tensors written":
        tensors.unlink()
    else:  # the JSON never became visible: the tensors file alone does not count
        record.unlink()
    resumed, _, _ = make_trainer(run, dataset, catalogue)
    assert resumed.resume() and resumed.step == previous
    damaged = [
        json.loads(line)
        for line in (run / "events.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "checkpoint_damaged"
    ]
    assert len(damaged) == (0 if lost == "json written" else 1)
    _same_run(resumed, resumed.fit(), reference, expected)
