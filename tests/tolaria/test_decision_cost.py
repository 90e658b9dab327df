"""What a decision costs the training thread: the parameters counted again only after a change, and the
validation pass without autograd."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from esper.tolaria.data import Dataset
from esper.urza import BlueprintCatalogue
from tests.tolaria.support import growth_trainer


def test_parameters_are_counted_only_after_the_host_changed_and_follow_each_growth(
    tmp_path: Path, dataset: Dataset, catalogue: BlueprintCatalogue
) -> None:
    trainer = growth_trainer(tmp_path / "run", dataset, catalogue)
    host = trainer.host
    count = host.parameter_count
    counted: list[int] = []

    def counting() -> int:
        counted.append(trainer.step)
        return count()

    host.parameter_count = counting  # type: ignore[method-assign]
    trainer.fit()
    decisions = trainer.decisions
    # once at the start and once after each change of the host (germinated, parameters added, merged),
    # never at every decision
    assert len(counted) < decisions / 2, (counted, decisions)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len({r["parameters"] for r in records}) >= 2, "the counts never followed the growth"
    assert records[-1]["parameters"] == count() == trainer.host.parameter_count()


def test_validation_runs_under_inference_mode_and_leaves_the_host_training(
    tmp_path: Path, dataset: Dataset, catalogue: BlueprintCatalogue
) -> None:
    trainer = growth_trainer(tmp_path / "run", dataset, catalogue)
    modes: list[tuple[bool, bool]] = []

    def note(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        modes.append((torch.is_inference_mode_enabled(), module.training))

    trainer.host.register_forward_hook(note)
    trainer._evaluate()
    assert modes == [(True, False)]
    assert trainer.host.training
