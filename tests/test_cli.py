"""The `esper` command line explains itself and never fakes output."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import esper
from esper.cli import app

runner = CliRunner()


def test_version() -> None:
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0
    assert esper.__version__ in result.stdout


@pytest.mark.parametrize(
    "command",
    [
        ["run"],
        ["serve"],
        ["report"],
        ["reports"],
        ["blueprints"],
        ["simic", "train"],
        ["simic", "serve"],
        ["bus", "stats"],
        ["policy", "show"],
        ["version"],
    ],
)
def test_every_command_has_help(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.stdout
