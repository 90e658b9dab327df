"""The `esper` command line: the composition root that builds the parts and wires them together."""

from __future__ import annotations

import typer
from rich.console import Console

import esper
from esper.leyline import ConfigurationError, EsperSettings, load_settings

app = typer.Typer(
    name="esper",
    help="Esper grows neural networks while they train.",
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

console = Console()
err_console = Console(stderr=True)

NOT_BUILT_EXIT = 2


def _not_built(command: str, issue: int) -> None:
    err_console.print(f"[bold red]esper {command}[/]: not built yet (tracked in issue {issue}).")
    raise typer.Exit(NOT_BUILT_EXIT)


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


@app.command()
def run() -> None:
    """Grow a model on a task (sklearn's digits by default) and write a run directory."""
    _settings()
    _not_built("run", 3)


@app.command()
def serve() -> None:
    """Run a node's long-lived services under Weatherlight."""
    _not_built("serve", 6)


@app.command()
def report() -> None:
    """Render a run directory's report with plots."""
    _not_built("report", 3)


@app.command()
def reports() -> None:
    """List a run's field reports."""
    _not_built("reports", 5)


@app.command()
def blueprints() -> None:
    """List the blueprint catalogue (Urza)."""
    _not_built("blueprints", 3)


@simic_app.command("train")
def simic_train() -> None:
    """Train a policy offline from run directories."""
    _not_built("simic train", 7)


@simic_app.command("serve")
def simic_serve() -> None:
    """Consume field reports from the bus, train in rounds, publish policy updates."""
    _not_built("simic serve", 7)


@bus_app.command("stats")
def bus_stats() -> None:
    """Show streams, lengths, groups, pending and dead-letter counts."""
    _not_built("bus stats", 6)


@policy_app.command("show")
def policy_show() -> None:
    """Show the current policy version, lineage and validation figures."""
    _not_built("policy show", 7)


def main() -> None:
    """Entry point of the `esper` script."""
    app()
