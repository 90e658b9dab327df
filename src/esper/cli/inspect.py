"""Inspection commands: the report, field reports, the blueprint catalogue, the bus and the policy."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from esper.cli.common import (
    _settings,
    app,
    blueprints_app,
    bus_app,
    console,
    err_console,
    policy_app,
)
from esper.cli.observe import print_table
from esper.leyline import (
    ConfigurationError,
    load_settings,
    pb,
)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="The run directory (the one `esper run` wrote).")],
) -> None:
    """Render a run directory's report: accuracy, parameter and lifecycle plots (PNG) and report.md,
    written to RUN_DIR/report."""
    from esper.nissa.report import ReportError, write_report

    try:
        files = write_report(run_dir)
    except ReportError as exc:
        err_console.print(f"[bold red]esper report failed[/]: {exc}")
        raise typer.Exit(1) from exc
    console.print(f"report: {files.markdown}")
    for image in files.images:
        console.print(f"plot: {image}")


@app.command()
def reports(
    run_dir: Annotated[Path, typer.Argument(help="The run directory (the one `esper run` wrote).")],
    outcome: Annotated[
        str | None, typer.Option(help="Only this outcome: success, neutral, regression or aborted.")
    ] = None,
    status: Annotated[
        str | None, typer.Option(help="Only this publication status: pending, published or dropped.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object, not a table.")] = False,
) -> None:
    """List a run's field reports (RUN_DIR/tamiyo.sqlite3): outcome, metrics and publication status."""
    _print_field_reports(run_dir, outcome, status, as_json)


def _print_field_reports(run_dir: Path, outcome: str | None, status: str | None, as_json: bool) -> None:
    import json

    from google.protobuf.json_format import MessageToDict
    from rich.table import Table

    from esper.leyline import ContractViolation, from_short_name, short_name
    from esper.nissa.layout import RunLayout
    from esper.tamiyo import OUTBOX_STATUSES, StoreError, TamiyoStore

    if status is not None and status not in OUTBOX_STATUSES:
        err_console.print(
            f"[bold red]--status[/] must be one of {', '.join(OUTBOX_STATUSES)}, got {status!r}"
        )
        raise typer.Exit(2)
    try:
        wanted = None if outcome is None else from_short_name(pb.FieldReportOutcome, outcome.upper())
    except ContractViolation as exc:
        err_console.print(f"[bold red]--outcome[/]: {exc}")
        raise typer.Exit(2) from exc
    path = RunLayout(run_dir).tamiyo_store
    try:
        with TamiyoStore(path, create=False) as store:
            stored = store.field_reports(outcome=wanted, status=status)  # type: ignore[arg-type]
    except StoreError as exc:
        err_console.print(f"[bold red]cannot read field reports[/]: {exc}")
        raise typer.Exit(1) from exc
    if as_json:
        rows = [
            {
                **MessageToDict(s.report, preserving_proto_field_name=True),
                "status": s.status,
                "attempts": s.attempts,
                "last_error": s.last_error,
            }
            for s in stored
        ]
        typer.echo(json.dumps({"store": str(path), "field_reports": rows}))
        return
    table = Table(title=f"Field reports: {path} ({len(stored)})")
    table.add_column("report / command", overflow="fold", ratio=1)
    for column in ("action", "seed", "outcome", "acc Δ", "loss Δ", "params Δ", "N"):
        table.add_column(column, no_wrap=True, justify="right" if "Δ" in column or column == "N" else "left")
    table.add_column("status", overflow="fold")
    for s in stored:
        report, metrics = s.report, s.report.metrics

        def figure(key: str, spec: str, metrics: Any = metrics) -> str:
            return format(metrics[key], spec) if key in metrics else "—"

        table.add_row(
            f"{report.report_id}\n[dim]{report.command_id}[/]",
            short_name(pb.PolicyAction, report.action) if report.action else "—",
            report.seed_id or "—",
            short_name(pb.FieldReportOutcome, report.outcome),
            figure("accuracy_delta", "+.4f"),
            figure("loss_delta", "+.4f"),
            figure("param_delta", "+.0f"),
            str(report.observation_window_epochs),
            s.status if s.status != "dropped" else f"dropped: {s.last_error}",
        )
    print_table(table)


@blueprints_app.callback(invoke_without_command=True)
def blueprints(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print the catalogue as JSON instead of a table."),
) -> None:
    """List the blueprint catalogue (Urza) at <ESPER_DATA_DIR>/urza.sqlite3, seeding it on first use."""
    if ctx.invoked_subcommand is not None:
        return
    import json

    from rich.table import Table

    from esper.leyline import short_name
    from esper.nissa.layout import DataLayout
    from esper.urza import BlueprintCatalogue, UrzaError

    settings = _settings()
    try:
        with BlueprintCatalogue.open_default(DataLayout(settings.data_dir).catalogue) as catalogue:
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
    table = Table(title=f"Blueprints ({DataLayout(settings.data_dir).catalogue})")
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
    print_table(table)


def _change_catalogue(verb: str, blueprint_id: str, reason: str | None) -> None:
    """Quarantine (with `reason`) or release a blueprint, and publish the change on the bus."""
    from esper.nissa.layout import DataLayout
    from esper.oona import BusError, OonaSettings, open_bus
    from esper.urza import BlueprintCatalogue, BusChangePublisher, NotificationFailed, UrzaError

    settings = _settings()
    try:
        bus = open_bus(settings, load_settings(OonaSettings))
    except (ConfigurationError, BusError) as exc:
        err_console.print(f"[bold red]cannot open the bus[/]: {exc}")
        raise typer.Exit(2 if isinstance(exc, ConfigurationError) else 1) from exc
    path = DataLayout(settings.data_dir).catalogue
    try:
        with BlueprintCatalogue.open_default(path, publisher=BusChangePublisher(bus)) as catalogue:
            if reason is not None:
                descriptor = catalogue.quarantine(blueprint_id, reason)
            else:
                descriptor = catalogue.unquarantine(blueprint_id)
    except NotificationFailed as exc:
        err_console.print(f"[bold yellow]{verb}d, but not announced yet[/]: {exc}")
        raise typer.Exit(1) from exc
    except UrzaError as exc:
        err_console.print(f"[bold red]cannot {verb} {blueprint_id}[/]: {exc}")
        raise typer.Exit(2) from exc
    finally:
        bus.close()
    console.print(f"{blueprint_id}: {verb}d at revision {descriptor.revision}, announced on the bus")


@blueprints_app.command("operations")
def blueprints_operations(
    as_json: bool = typer.Option(False, "--json", help="Print the operations as JSON instead of a table."),
) -> None:
    """List the growth operations (Urza): what a WIDEN or DEEPEN may change, by how much, at what cost."""
    import json

    from rich.table import Table

    from esper.urza import GROWTH_OPERATIONS

    entries = [operation.as_dict() for operation in GROWTH_OPERATIONS]
    if as_json:
        typer.echo(json.dumps(entries, indent=2))
        return
    table = Table(title="Growth operations")
    for column in ("id", "kind", "operation", "host kinds", "amounts"):
        table.add_column(column, no_wrap=True)
    table.add_column("cost per unit (parameters)", overflow="fold", ratio=1)
    for operation in GROWTH_OPERATIONS:
        entry = operation.as_dict()
        table.add_row(
            operation.op_id,
            operation.kind,
            str(entry["seed_operation"]),
            ", ".join(operation.host_kinds),
            ", ".join(str(amount) for amount in operation.allowed_amounts),
            operation.cost_per_unit,
        )
    print_table(table)


@blueprints_app.command("quarantine")
def blueprints_quarantine(
    blueprint_id: Annotated[str, typer.Argument(help="Id of the blueprint (see `esper blueprints`).")],
    reason: Annotated[str, typer.Option(help="Why: recorded in the catalogue and shown by the list.")],
) -> None:
    """Quarantine a blueprint: never offered or built again, and every Tamiyo on the bus refuses it."""
    _change_catalogue("quarantine", blueprint_id, reason)


@blueprints_app.command("unquarantine")
def blueprints_unquarantine(
    blueprint_id: Annotated[str, typer.Argument(help="Id of the blueprint (see `esper blueprints`).")],
) -> None:
    """Lift a blueprint's quarantine, and announce it on the bus."""
    _change_catalogue("unquarantine", blueprint_id, None)


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

    from esper.nissa.layout import DataLayout
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
    where = settings.bus_url or str(DataLayout(settings.data_dir).bus)
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
    print_table(table)


@policy_app.command("show")
def policy_show(
    state_dir: Annotated[Path | None, typer.Option(help="Simic's state [<ESPER_DATA_DIR>/simic].")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object, not tables.")] = False,
) -> None:
    """Show the current policy version, lineage and validation figures (from Simic's state directory)."""
    import json

    from rich.table import Table

    from esper.nissa.layout import DataLayout
    from esper.simic.state import SimicState
    from esper.tamiyo import PolicyUpdateRejected, read_payload_header

    root = state_dir or DataLayout(_settings().data_dir).simic
    if not root.is_dir():
        err_console.print(f"no Simic state at {root}: no policy has been trained yet (esper simic train)")
        raise typer.Exit(1)
    state = SimicState(root)
    try:
        header = read_payload_header(state.policy_path.read_bytes()) if state.policy_path.exists() else {}
    except PolicyUpdateRejected as exc:
        err_console.print(f"[bold red]{state.policy_path} is not a policy payload[/]: {exc}")
        raise typer.Exit(1) from exc
    rounds = state.rounds()
    published = [r for r in rounds if r["published"]]
    if as_json:
        typer.echo(json.dumps({"state_dir": str(root), "current": header, "rounds": rounds}))
        return
    if header:
        console.print(
            f"current policy [bold]{header.get('tamiyo_policy_version')}[/] "
            f"sequence {header.get('sequence')} "
            f"(parent {header.get('parent_version') or '-'}), {header.get('architecture_version')}, "
            f"registry {header.get('registry_digest')}"
        )
    else:
        console.print("no policy published yet")
    table = Table(title=f"Lineage ({root})")
    for column in ("sequence", "version", "parent", "mode", "transitions", "explained var", "KL", "held-out"):
        table.add_column(column)
    for r in published:
        metrics = r["metrics"]
        held_out = metrics.get("validation.holdout_surrogate", metrics.get("validation.holdout_agreement"))

        def figure(value: float | None) -> str:
            return "—" if value is None else f"{value:.4g}"  # missing is shown as missing

        table.add_row(
            str(r["sequence"]),
            r["version"],
            r["parent_version"],
            r["mode"],
            str(r["transitions"]),
            figure(metrics.get("ppo.explained_variance")),
            figure(metrics.get("validation.action_kl")),
            figure(held_out),
        )
    print_table(table)
    refused = [r for r in rounds if not r["published"]]
    if refused:
        last = refused[-1]
        console.print(f"{len(refused)} round(s) not published; last: {'; '.join(last['reasons'])}")
