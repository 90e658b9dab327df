"""`esper run` refuses bad input with a clear error and no traceback, leaves nothing behind when its start
fails, and never lets a failing clean-up hide the error that ended the run (issue 16, items 2, 13, 15)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import Result

from esper.assembly import RunAssembly, RunSummary
from esper.leyline import EsperError
from tests.conftest import esper_run, finished_summary
from tests.tolaria.test_data import huge_npz


def assert_clear_failure(result: Result, exit_code: int, *expected: str) -> None:
    """Failed with `exit_code`, the expected words on the terminal, and no traceback."""
    assert result.exit_code == exit_code, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # typer.Exit, not an escaped error
    assert "Traceback" not in result.output
    shown = "".join(result.output.split())  # the console wraps long lines anywhere
    for words in expected:
        assert "".join(words.split()) in shown, result.output


def good_npz(path: Path) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.normal(size=(60, 5)), y_train=np.arange(60) % 3)
    return path


# -- item 15: a failed start leaves nothing ------------------------------------------------------------


def test_a_start_with_bad_data_leaves_no_run_directory_and_the_fixed_rerun_works(
    data_dir: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=np.zeros((10, 3)))  # no labels
    assert_clear_failure(esper_run("--task", str(bad), "--run-dir", str(run_dir)), 1, "missing key")
    assert not run_dir.exists()
    result = esper_run("--task", str(good_npz(tmp_path / "good.npz")), "--run-dir", str(run_dir))
    assert result.exit_code == 0, result.output
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def test_a_start_that_fails_after_creating_files_removes_them_and_only_them(
    data_dir: Path, tmp_path: Path
) -> None:
    """A truncated policy checkpoint is found once Tamiyo's store exists: what this start created goes,
    what was in the directory before stays."""
    from esper.tamiyo import GNNPolicy
    from esper.tamiyo.settings import TamiyoSettings

    checkpoint = tmp_path / "policy.safetensors"
    GNNPolicy(TamiyoSettings()).save(checkpoint)
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    result = esper_run("--policy", "gnn", "--policy-checkpoint", str(checkpoint), "--run-dir", str(run_dir))
    assert_clear_failure(result, 1, "policy checkpoint", "cannot be read")
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]


# -- item 13: clear errors instead of tracebacks -------------------------------------------------------


def test_an_npz_claiming_a_huge_array_is_refused_before_anything_is_created(
    data_dir: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    result = esper_run("--task", str(huge_npz(tmp_path / "huge.npz")), "--run-dir", str(run_dir))
    assert_clear_failure(result, 1, "x_train declares shape (5000000000,)")
    assert not run_dir.exists()


@pytest.mark.parametrize("value", ["inf", "1e300", "nan"])
def test_an_infinite_or_absurd_step_timeout_is_a_configuration_error(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("TAMIYO_STEP_TIMEOUT_MS", value)
    result = esper_run("--run-dir", str(tmp_path / "run"))
    assert_clear_failure(result, 2, "TAMIYO_STEP_TIMEOUT_MS")
    assert not (tmp_path / "run").exists()


def test_a_dotenv_that_is_not_utf8_is_a_configuration_error(data_dir: Path, tmp_path: Path) -> None:
    (tmp_path / ".env").write_bytes(b"TAMIYO_STEP_TIMEOUT_MS=50\n# caf\xe9\n")
    assert_clear_failure(esper_run("--run-dir", str(tmp_path / "run")), 2, ".env is not UTF-8")


def test_a_run_directory_that_cannot_be_created_is_a_configuration_error(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a-file").write_text("")
    result = esper_run("--run-dir", str(tmp_path / "a-file" / "run"))
    assert_clear_failure(result, 2, "--run-dir", "is not a directory")
    monkeypatch.setenv("ESPER_DATA_DIR", str(tmp_path / "a-file" / "data"))
    assert_clear_failure(
        esper_run("--run-dir", str(tmp_path / "run")), 2, "ESPER_DATA_DIR", "is not a directory"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
@pytest.mark.parametrize("which", ["run", "data"])
def test_a_read_only_run_or_data_directory_is_a_configuration_error(
    data_dir: Path, tmp_path: Path, which: str
) -> None:
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        if which == "run":
            result = esper_run("--run-dir", str(read_only / "run"))
        else:
            os.environ["ESPER_DATA_DIR"] = str(read_only / "data")
            result = esper_run("--run-dir", str(tmp_path / "run"))
        assert_clear_failure(result, 2, "is not writable")
    finally:
        read_only.chmod(0o755)


def test_a_disk_error_while_starting_is_reported_without_a_traceback(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the up-front checks cannot see (as root, or a disk that fills up) still ends in a message."""
    import esper.tamiyo.records.store

    def read_only_disk(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied", str(tmp_path / "run" / "tamiyo.sqlite3"))

    monkeypatch.setattr(esper.tamiyo.records.store.TamiyoStore, "__init__", read_only_disk)
    assert_clear_failure(esper_run("--run-dir", str(tmp_path / "run")), 1, "Permission denied")
    assert not (tmp_path / "run").exists()


# -- item 2: a failing clean-up never hides the error that ended the run --------------------------------


def fake_experiment(ending: EsperError | None) -> Callable[..., RunSummary]:
    """A `RunAssembly.train` that starts the run (config.json) and then fails with `ending`, or completes."""

    def train(self: RunAssembly, *args: Any, **kwargs: Any) -> RunSummary:
        config = self.config
        config.run_dir.mkdir(parents=True, exist_ok=True)
        (config.run_dir / "config.json").write_text(json.dumps(config.to_json()))
        (config.run_dir / "events.jsonl").touch()
        if ending is not None:
            raise ending
        return finished_summary(
            run_id=config.training_run_id, task=config.task, host=config.host, policy=config.policy
        )

    return train


def fail_cleanups(monkeypatch: pytest.MonkeyPatch) -> None:
    """The two clean-ups of the issue fail: metrics.prom on a full disk, and the channel's group deletion."""
    import esper.assembly.run
    from esper.oona import BusUnavailable
    from esper.tolaria.emergency import BusEmergencyChannel

    def full_disk(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    def group_stuck(self: Any) -> None:
        raise BusUnavailable("delete group emergency-run", "redis", 7, "connection refused")

    monkeypatch.setattr(esper.assembly.run, "write_snapshot", full_disk)
    monkeypatch.setattr(BusEmergencyChannel, "close", group_stuck)


def cleanup_events(run_dir: Path) -> list[str]:
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    return [e["cleanup"] for e in map(json.loads, lines) if e["kind"] == "cleanup_failed"]


def test_a_failing_clean_up_after_a_failing_run_shows_the_original_error(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    monkeypatch.setattr(RunAssembly, "train", fake_experiment(EsperError("the real reason")))
    fail_cleanups(monkeypatch)
    with caplog.at_level(logging.ERROR, logger="esper.cli"):
        result = esper_run("--run-dir", str(run_dir))
    assert_clear_failure(result, 1, "esper run failed: the real reason")
    logged = caplog.text
    assert "write metrics.prom" in logged and "No space left on device" in logged
    assert "close the emergency channel" in logged and "failed after 7 attempt(s)" in logged
    assert cleanup_events(run_dir) == ["close the emergency channel", "write metrics.prom"]


def test_a_failing_clean_up_after_a_successful_run_makes_the_exit_status_one(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    monkeypatch.setattr(RunAssembly, "train", fake_experiment(None))
    fail_cleanups(monkeypatch)
    result = esper_run("--run-dir", str(run_dir))
    assert_clear_failure(result, 1, "the run finished but its clean-up failed", "No space left on device")
    assert cleanup_events(run_dir) == ["close the emergency channel", "write metrics.prom"]
