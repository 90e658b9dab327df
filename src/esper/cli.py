"""The `esper` command line: the composition root that builds the parts and wires them together."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

import esper
from esper.leyline import ConfigurationError, EsperError, EsperSettings, load_settings, resolve_signing_secret

if TYPE_CHECKING:
    from esper.tolaria.controller import Controller

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


def _build_controller(policy: str, secret: bytes) -> Controller:
    """The one place a run's controller is built: Tamiyo with the chosen policy, bound for Tolaria."""
    from esper.tamiyo import TamiyoService
    from esper.tamiyo.heuristic import HeuristicPolicy
    from esper.tamiyo.settings import TamiyoSettings
    from esper.tolaria.controller import BoundController

    tamiyo_settings = load_settings(TamiyoSettings)
    if policy != "heuristic":
        raise ConfigurationError(f"unknown policy {policy!r}; available: heuristic")
    heuristic = HeuristicPolicy(tamiyo_settings)
    service = TamiyoService(tamiyo_settings, heuristic, secret)
    return BoundController(decide=service.evaluate_step, save=heuristic.state, load=heuristic.restore)


@app.command()
def run(
    *,
    task: Annotated[
        str, typer.Option(help="Task: 'digits' (sklearn), 'generated', or a path to an .npz file.")
    ] = "digits",
    host: Annotated[
        str, typer.Option(help="Host model: 'mlp' or 'cnn' (cnn needs image data such as digits).")
    ] = "mlp",
    epochs: Annotated[
        int | None, typer.Option(help="Passes over the training split [TOLARIA_EPOCHS, 40].")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of every random choice [TOLARIA_SEED, 0].")] = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="Run directory [<ESPER_DATA_DIR>/runs/<run id>].")
    ] = None,
    policy: Annotated[str, typer.Option(help="Tamiyo's policy: 'heuristic'.")] = "heuristic",
    decision_interval: Annotated[
        int | None,
        typer.Option(help="Training steps between controller decisions [TOLARIA_DECISION_INTERVAL, 20]."),
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size [TOLARIA_BATCH_SIZE, 64].")] = None,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate [TOLARIA_LR, 0.003].")] = None,
    difficulty: Annotated[float, typer.Option(help="Difficulty in [0, 1] of the generated task.")] = 0.5,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in --run-dir from its last checkpoint (its config wins).")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
) -> None:
    """Grow a model on a task (sklearn's digits by default) and write a run directory."""
    from esper.kasmina import KasminaSettings
    from esper.tolaria.run import (
        RunConfig,
        new_training_run_id,
        resolve_config,
        run_experiment,
        summary_table,
    )
    from esper.tolaria.settings import TolariaSettings

    settings = _settings()
    overrides: dict[str, Any] = {
        "epochs": epochs,
        "seed": seed,
        "decision_interval": decision_interval,
        "batch_size": batch_size,
        "lr": lr,
    }
    try:
        tolaria = load_settings(
            TolariaSettings, None, **{k: v for k, v in overrides.items() if v is not None}
        )
        kasmina = load_settings(KasminaSettings)
        if resume and run_dir is None:
            raise ConfigurationError("--resume needs --run-dir")
        run_id = new_training_run_id()
        config = resolve_config(
            RunConfig(
                task=task,
                host=host,
                policy=policy,
                difficulty=difficulty,
                run_dir=run_dir or settings.data_dir / "runs" / run_id,
                catalogue_path=settings.data_dir / "urza.sqlite3",
                training_run_id=run_id,
                tolaria=tolaria,
                kasmina=kasmina,
            ),
            resume=resume,
        )
        secret = resolve_signing_secret(settings)
        controller = _build_controller(config.policy, secret)
        summary = run_experiment(
            config, controller, secret, resume=resume, console=console, progress=progress
        )
    except EsperError as exc:
        err_console.print(f"[bold red]esper run failed[/]: {exc}")
        raise typer.Exit(1) from exc
    console.print(summary_table(summary))
    console.print(f"run directory: {config.run_dir}")


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
def blueprints(
    as_json: bool = typer.Option(False, "--json", help="Print the catalogue as JSON instead of a table."),
) -> None:
    """List the blueprint catalogue (Urza) at <ESPER_DATA_DIR>/urza.sqlite3, seeding it on first use."""
    import json

    from rich.table import Table

    from esper.leyline import pb, short_name
    from esper.urza import BlueprintCatalogue, UrzaError

    settings = _settings()
    try:
        with BlueprintCatalogue.open_default(settings.data_dir / "urza.sqlite3") as catalogue:
            entries = [
                {
                    "id": d.blueprint_id,
                    "name": d.name,
                    "tier": short_name(pb.BlueprintTier, d.tier),
                    "risk": d.risk,
                    "stage": d.stage,
                    "host_kinds": list(d.host_kinds),
                    "quarantine": d.quarantine,
                    "quarantine_reason": catalogue.quarantine_reason(d.blueprint_id),
                    "allowed_parameters": {
                        name: [b.min_value, b.max_value] for name, b in sorted(d.allowed_parameters.items())
                    },
                    "description": d.description,
                    "revision": d.revision,
                }
                for d in catalogue.list()
            ]
    except UrzaError as exc:
        err_console.print(f"[bold red]blueprint catalogue error[/]: {exc}")
        raise typer.Exit(2) from exc
    if as_json:
        typer.echo(json.dumps(entries, indent=2))
        return
    table = Table(title=f"Blueprints ({settings.data_dir / 'urza.sqlite3'})")
    for column in ("id", "name", "tier", "risk", "kinds", "quarantine"):
        table.add_column(column, no_wrap=True)
    table.add_column("description", overflow="fold", ratio=1)
    for entry in entries:
        table.add_row(
            str(entry["id"]),
            str(entry["name"]),
            str(entry["tier"]),
            f"{entry['risk']:.2f}",
            ", ".join(entry["host_kinds"]),
            f"yes: {entry['quarantine_reason']}" if entry["quarantine"] else "no",
            str(entry["description"]),
        )
    console.print(table)


@simic_app.command("train")
def simic_train() -> None:
    """Train a policy offline from run directories."""
    _not_built("simic train", 7)


@simic_app.command("serve")
def simic_serve() -> None:
    """Consume field reports from the bus, train in rounds, publish policy updates."""
    _not_built("simic serve", 7)


@bus_app.command("stats")
def bus_stats(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object, not a table.")] = False,
) -> None:
    """Show streams, lengths, groups, pending and dead-letter counts of the configured bus.

    The bus is the one `ESPER_BUS_URL` names: the embedded file in `ESPER_DATA_DIR` when it is empty.
    """
    import json
    from dataclasses import asdict

    from rich.table import Table

    from esper.oona import BusError, OonaSettings, open_bus

    settings = _settings()
    try:
        bus = open_bus(settings, load_settings(OonaSettings))
    except (ConfigurationError, BusError) as exc:
        err_console.print(f"[bold red]cannot open the bus[/]: {exc}")
        raise typer.Exit(2 if isinstance(exc, ConfigurationError) else 1) from exc
    try:
        streams = bus.stats()
    except BusError as exc:
        err_console.print(f"[bold red]cannot read the bus[/]: {exc}")
        raise typer.Exit(1) from exc
    finally:
        bus.close()
    where = settings.bus_url or str(settings.data_dir / "bus.sqlite3")
    if as_json:
        typer.echo(json.dumps({"bus": where, "streams": [asdict(s) for s in streams]}))
        return
    if not streams:
        console.print(f"no streams yet on {where}")
        return
    table = Table(title=f"Oona bus: {where}")
    for column in ("stream", "length", "group", "consumers", "pending", "dead letters"):
        table.add_column(column, justify="left" if column in ("stream", "group") else "right")
    for s in streams:
        rows = [(g.name, str(g.consumers), str(g.pending)) for g in s.groups] or [("—", "", "")]
        for index, (group, consumers, pending) in enumerate(rows):
            first = index == 0
            table.add_row(
                s.stream if first else "",
                str(s.length) if first else "",
                group,
                consumers,
                pending,
                str(s.dead_letters) if first else "",
            )
    console.print(table)


@policy_app.command("show")
def policy_show() -> None:
    """Show the current policy version, lineage and validation figures."""
    _not_built("policy show", 7)


def main() -> None:
    """Entry point of the `esper` script."""
    app()
