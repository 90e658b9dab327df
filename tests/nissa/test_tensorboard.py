"""TensorBoard event files and the metrics CSV of a run, read back with TensorBoard's own reader."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from esper.cli import app
from esper.nissa.runs import read_jsonl
from esper.nissa.tensorboard import export_run


def _accumulator(log_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


@pytest.mark.slow
def test_esper_run_leaves_tensorboard_scalars_and_growth_text_that_tensorboard_reads(runs_dir: Path) -> None:
    run = runs_dir / "grown"  # written by `esper run` itself (the session fixture)
    accumulator = _accumulator(run / "tensorboard")
    scalars = accumulator.Tags()["scalars"]
    assert {"validation/accuracy", "validation/loss", "train/loss", "model/parameters"} <= set(scalars)
    evaluations = [r for r in read_jsonl(run / "metrics.jsonl") if not r.get("final")]
    accuracy = accumulator.Scalars("validation/accuracy")
    assert [e.step for e in accuracy] == [r["step"] for r in evaluations]
    assert accuracy[-1].value == pytest.approx(evaluations[-1]["validation_accuracy"], rel=1e-6)  # float32
    parameters = accumulator.Scalars("model/parameters")
    assert [e.value for e in parameters] == [float(r["parameters"]) for r in evaluations]
    growth = accumulator.Tensors("growth/text_summary")
    texts = [t.tensor_proto.string_val[0].decode() for t in growth]
    assert any("-> GERMINATED" in text for text in texts)
    germinated = next(e for e in read_jsonl(run / "events.jsonl") if e.get("to_stage") == "GERMINATED")
    assert germinated["step"] in [t.step for t in growth]


@pytest.mark.slow
def test_a_second_export_replaces_the_first_instead_of_doubling_points(runs_dir: Path) -> None:
    run = runs_dir / "grown"
    before = len(_accumulator(run / "tensorboard").Scalars("validation/accuracy"))
    result = CliRunner().invoke(app, ["tensorboard", str(run)])
    assert result.exit_code == 0, result.output
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert len(_accumulator(run / "tensorboard").Scalars("validation/accuracy")) == before


@pytest.mark.slow
def test_the_metrics_csv_has_one_row_per_evaluation_with_slot_stages(runs_dir: Path) -> None:
    run = runs_dir / "grown"
    files = export_run(run)
    with open(files.csv, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    evaluations = [r for r in read_jsonl(run / "metrics.jsonl") if "validation_accuracy" in r]
    assert len(rows) == len(evaluations)
    assert float(rows[0]["validation_accuracy"]) == evaluations[0]["validation_accuracy"]
    assert any(key.endswith("_stage") for key in rows[0])


def test_exporting_a_folder_that_is_not_a_run_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["tensorboard", str(tmp_path)])
    assert result.exit_code == 2
