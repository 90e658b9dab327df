"""The examples run, in their smoke mode, as a user would start them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("script", ["grow_my_model.py", "gym_agent.py"])
def test_the_example_runs_in_smoke_mode(script: str, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
        "ESPER_DATA_DIR": str(tmp_path / "data"),
        "TAMIYO_STEP_TIMEOUT_MS": "2000",  # a shared CI core is slow; nothing is timed here
    }
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / script), "--smoke"],
        check=False,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    if script == "grow_my_model.py":
        assert "same outputs: True" in done.stdout
    else:
        assert "episode 0" in done.stdout
