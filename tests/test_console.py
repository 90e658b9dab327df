"""Console hygiene: during a run, internal events go to RUN_DIR/esper.log; the terminal shows them only
with --verbose."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from esper.cli import common as cli
from esper.nissa.layout import RunLayout


@pytest.fixture(autouse=True)
def _quiet_after() -> object:
    yield None
    cli._Verbosity.verbose = False
    cli._terminal_log(logging.WARNING)


def test_internal_events_of_a_run_go_to_its_log_not_the_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    undo = cli._run_log(RunLayout(tmp_path).log)
    logging.getLogger("esper.tamiyo").critical("decision_deadline_exceeded: the decision took too long")
    logging.getLogger("esper.tamiyo").warning("graph_missing_features: no gradient norm")
    undo()
    assert "decision_deadline_exceeded" not in capsys.readouterr().err
    log = RunLayout(tmp_path).log.read_text()
    assert "decision_deadline_exceeded" in log and "graph_missing_features" in log


def test_verbose_shows_internal_events_on_the_terminal_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cli._Verbosity.verbose = True
    undo = cli._run_log(RunLayout(tmp_path).log)
    logging.getLogger("esper.tamiyo").warning("graph_missing_features: no gradient norm")
    undo()
    assert "graph_missing_features" in capsys.readouterr().err
    assert "graph_missing_features" in RunLayout(tmp_path).log.read_text()


def test_outside_a_run_warnings_reach_the_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    cli._terminal_log(logging.WARNING)
    logging.getLogger("esper.urza").warning("catalogue feed lost its group")
    logging.getLogger("esper.urza").info("routine detail")
    err = capsys.readouterr().err
    assert "catalogue feed lost its group" in err
    assert "routine detail" not in err
