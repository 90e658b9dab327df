"""A small real run that grows, made once per session and copied by the tests that change it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from esper.cli import app


@pytest.fixture(scope="session")
def grown_run_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A three-epoch run on a hard generated task that germinates seeds (made once, never changed)."""
    root = tmp_path_factory.mktemp("grown")
    run_dir = root / "runs" / "grown"
    env = {"ESPER_DATA_DIR": str(root / "data"), "ESPER_SIGNING_SECRET": "nissa-test-secret-0123456789"}
    args = ["run", "--task", "generated", "--difficulty", "0.9", "--epochs", "3", "--decision-interval", "5"]
    result = CliRunner().invoke(app, [*args, "--run-dir", str(run_dir), "--no-progress"], env=env)
    assert result.exit_code == 0, result.output
    return run_dir


@pytest.fixture
def runs_dir(grown_run_template: Path, tmp_path: Path) -> Path:
    """A folder of runs holding a copy of the grown run (the test may change it)."""
    root = tmp_path / "runs"
    shutil.copytree(grown_run_template, root / "grown")
    return root
