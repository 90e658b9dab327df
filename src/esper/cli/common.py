"""What every `esper` command shares: the typer apps, the consoles, the global options and the settings."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

import esper
from esper.cli import export as cli_export
from esper.cli.observe import register as register_observing
from esper.leyline import (
    ConfigurationError,
    EsperSettings,
    load_settings,
)

app = typer.Typer(
    name="esper",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
simic_app = typer.Typer(help="Learn Tamiyo's policy from field reports (Simic).", no_args_is_help=True)
bus_app = typer.Typer(help="Inspect the message bus (Oona).", no_args_is_help=True)
policy_app = typer.Typer(help="Inspect Tamiyo's policy.", no_args_is_help=True)
app.add_typer(simic_app, name="simic")
app.add_typer(bus_app, name="bus")
app.add_typer(policy_app, name="policy")
blueprints_app = typer.Typer(
    help="The blueprint catalogue (Urza): list it, quarantine or release a blueprint.",
    invoke_without_command=True,
)
app.add_typer(blueprints_app, name="blueprints")
register_observing(app)  # runs, sql, compare, watch, tensorboard, dashboard; -h
cli_export.register(app)

console = Console()
err_console = Console(stderr=True)

HALTED_EXIT = 3
INTERRUPTED_EXIT = 130


class _Verbosity:
    """Whether internal events and logs reach the terminal (`esper --verbose`)."""

    verbose = False


def _terminal_log(level: int) -> None:
    """Send the `esper` loggers' records of `level` and above to stderr (replacing an earlier setting).

    Records below it reach no terminal: with a handler in place, Python's last-resort printer stays quiet.
    """
    logger = logging.getLogger("esper")
    logger.setLevel(logging.INFO)
    for handler in [h for h in logger.handlers if getattr(h, "esper_terminal", False)]:
        logger.removeHandler(handler)
    terminal = logging.StreamHandler(sys.stderr)
    terminal.esper_terminal = True  # type: ignore[attr-defined]
    terminal.setLevel(level)
    terminal.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(terminal)


def _run_log(path: Path) -> Callable[[], None]:
    """During a run, the `esper` loggers write to `path` (RUN_DIR/esper.log), and the terminal shows what
    a person acts on (progress, errors, the summary), not internal events, unless --verbose. Returns the
    undo."""
    log_file = logging.FileHandler(path, encoding="utf-8")
    log_file.setLevel(logging.INFO)
    log_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("esper")
    logger.addHandler(log_file)
    _terminal_log(logging.INFO if _Verbosity.verbose else logging.CRITICAL + 1)

    def undo() -> None:
        logger.removeHandler(log_file)
        log_file.close()
        _terminal_log(logging.INFO if _Verbosity.verbose else logging.WARNING)

    return undo


def _print_version(value: bool) -> None:
    if value:
        console.print(f"esper {esper.__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show internal events and logs on the terminal.")
    ] = False,
    _version: Annotated[
        bool,
        typer.Option("--version", is_eager=True, callback=_print_version, help="Print the version and exit."),
    ] = False,
) -> None:
    """Esper grows neural networks while they train.

    Exit status of every command: 0 done; 1 failed; 2 bad input or configuration; 3 run halted.

    Errors go to stderr as "<what failed>: <why>"; a halted run says how to resume it.
    """
    _Verbosity.verbose = verbose
    _terminal_log(logging.INFO if verbose else logging.WARNING)


def _settings() -> EsperSettings:
    try:
        return load_settings(EsperSettings)
    except ConfigurationError as exc:
        err_console.print(f"[bold red]configuration error[/]: {exc}")
        raise typer.Exit(2) from exc


@app.command()
def version() -> None:
    """Print Esper's version."""
    console.print(f"esper {esper.__version__}")


def _log_cleanup_failure(name: str, exc: Exception) -> None:
    """The clean-up reporter of a process: the failure goes to the log."""
    logging.getLogger("esper.cli").error("clean-up step %r failed: %s: %s", name, type(exc).__name__, exc)


def warn(message: str) -> None:
    """Tell the operator something they act on (a run's warning), on the terminal."""
    err_console.print(f"[bold yellow]warning[/]: {message}")
