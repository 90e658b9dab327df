"""Terminal manners: -h and --version, the exit-status convention in --help, tables within 80 columns."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console
from rich.table import Table
from typer.testing import CliRunner

import esper
from esper.cli import app
from esper.cli.observe import print_table


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ESPER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ESPER_SIGNING_SECRET", "manners-test-secret-0123456789")
    return tmp_path / "data"


def test_version_prints_the_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"esper {esper.__version__}"


@pytest.mark.parametrize("command", [[], ["runs"], ["bus", "stats"], ["blueprints"]])
def test_dash_h_is_help_everywhere(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "-h"], terminal_width=80)
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_help_documents_the_exit_status_convention() -> None:
    result = CliRunner().invoke(app, ["--help"], terminal_width=100)
    assert "Exit status of every command: 0 done; 1 failed; 2 bad input or configuration; 3 run halted" in (
        " ".join(result.output.split())
    )


@pytest.mark.parametrize("command", [["settings"], ["blueprints"]])
def test_wide_tables_switch_to_a_vertical_layout_within_80_columns(
    data_dir: Path, command: list[str]
) -> None:
    result = CliRunner().invoke(app, command, terminal_width=80)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80
    assert "…" not in result.output  # nothing cut
    assert any(line.strip().startswith("description") for line in lines)


def test_a_table_that_fits_stays_a_table() -> None:
    table = Table(title="t")
    table.add_column("a")
    table.add_row("1")
    out = Console(width=80, record=True, file=io.StringIO())
    print_table(table, out)
    assert "┃ a ┃" in out.export_text()
