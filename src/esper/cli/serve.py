"""`esper serve`: this node's long-lived services under Weatherlight."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from esper.cli.common import (
    HALTED_EXIT,
    _open_bus,
    _settings,
    app,
    console,
    err_console,
)
from esper.cli.observe import print_table
from esper.leyline import (
    ConfigurationError,
    EsperError,
    load_settings,
    pb,
)


@app.command()
def serve(
    services: Annotated[
        list[str] | None,
        typer.Option(
            "--service",
            help="A service to run; repeat for several [WEATHERLIGHT_SERVICES, simic]. Known: simic "
            "(Simic's learner, `esper simic serve`).",
        ),
    ] = None,
    actors: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Run this many of Simic's actors beside the services (actor-0 ..., each `esper simic "
            "actor`) [WEATHERLIGHT_ACTORS, 0].",
        ),
    ] = None,
    status: Annotated[
        bool, typer.Option("--status", help="Print the state of this node's services and exit.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="With --status: print the health file as JSON.")
    ] = False,
) -> None:
    """Run this node's long-lived services (Simic's learner by default) under Weatherlight, the supervisor.

    `--actors N` adds N of Simic's actors (actor-0 ... actor-N-1, each `esper simic actor`), which run
    episodes whose decisions and field reports feed the learner; an actor that finished its
    ACTOR_MAX_EPISODES exits with status 0 and is not restarted.

    Each service runs as a child process. One that crashes is restarted after a growing, jittered wait
    (WEATHERLIGHT_RESTART_INITIAL_MS, _MULTIPLIER, _MAX_MS, _JITTER); after WEATHERLIGHT_RESTART_LIMIT
    restarts within WEATHERLIGHT_RESTART_WINDOW_S it is given up, and that is announced. Ctrl-C or SIGTERM
    stops every service (SIGTERM, then SIGKILL after WEATHERLIGHT_STOP_TIMEOUT_S); so does an emergency
    HALT on the deployment's bus (exit status 3). A service given up makes the exit status 1.

    Every start, exit, restart and give-up is printed with its reason and published as telemetry on the
    bus. The state of every service is rewritten on each change to WEATHERLIGHT_HEALTH_FILE
    [<ESPER_DATA_DIR>/weatherlight/health.json]; `esper serve --status` shows it.
    """
    import os
    import socket

    from esper.oona import OonaSettings
    from esper.tolaria.emergency import BusEmergencyChannel
    from esper.weatherlight import Supervisor, WeatherlightSettings
    from esper.weatherlight.events import BusEventPublisher
    from esper.weatherlight.supervisor import stop_on_signals

    settings = _settings()
    try:
        overrides: dict[str, Any] = {"services": tuple(services)} if services else {}
        if actors is not None:
            overrides["actors"] = actors
        weatherlight = load_settings(WeatherlightSettings, None, **overrides)
        oona = load_settings(OonaSettings)
    except ConfigurationError as exc:
        err_console.print(f"[bold red]configuration error[/]: {exc}")
        raise typer.Exit(2) from exc
    health_path = weatherlight.health_path(settings)
    if status:
        _print_health(health_path, as_json)
        return
    bus = _open_bus(settings, oona)
    try:
        # No run named: the supervisor obeys the HALTs that concern every process on the bus.
        channel = BusEmergencyChannel.open(
            settings, oona, training_run_id="", origin=f"weatherlight {socket.gethostname()}/{os.getpid()}"
        )
    except EsperError as exc:  # BusError included
        bus.close()
        err_console.print(f"[bold red]cannot listen for emergencies[/]: {exc}")
        raise typer.Exit(1) from exc
    supervisor = Supervisor(
        weatherlight.service_specs(),
        weatherlight,
        health_path,
        sinks=[_print_supervisor_event, BusEventPublisher(bus)],
        emergency=channel,
    )
    try:
        with stop_on_signals(supervisor):
            outcome = supervisor.run()
    except EsperError as exc:  # BusError included
        err_console.print(f"[bold red]esper serve failed[/]: {exc}")
        raise typer.Exit(1) from exc
    finally:
        try:
            channel.close()
        finally:
            bus.close()
    console.print(f"weatherlight stopped: {outcome.reason}")
    if outcome.halted:
        raise typer.Exit(HALTED_EXIT)
    if outcome.given_up:
        err_console.print(f"[bold red]given up[/]: {', '.join(outcome.given_up)}")
        raise typer.Exit(1)


_EVENT_STYLES = {"INFO": "green", "WARNING": "yellow", "ERROR": "bold red", "CRITICAL": "bold red"}


def _print_supervisor_event(event: Any) -> None:
    """One line per Weatherlight event: time, who, what, why."""
    from rich.markup import escape

    from esper.leyline import short_name
    from esper.weatherlight.health import iso_time

    level = short_name(pb.TelemetryLevel, event.level)
    style = _EVENT_STYLES.get(level, "white")
    who = event.service or "weatherlight"
    console.print(
        f"[dim]{iso_time(event.wall_ns)}[/] {escape(who)} [{style}]{event.name}[/]: {escape(event.reason)}"
    )


def _print_health(path: Path, as_json: bool) -> None:
    """The health file as a table (or JSON), saying so when the supervisor that wrote it is gone."""
    import json
    import os

    from rich.table import Table

    from esper.weatherlight.health import HealthFileError, read_health

    try:
        document = read_health(path)
    except HealthFileError as exc:
        err_console.print(f"[bold red]no health to show[/]: {exc}")
        raise typer.Exit(1) from exc
    if as_json:
        typer.echo(json.dumps(document))
        return
    supervisor = document["supervisor"]
    state = str(supervisor.get("state"))
    pid = supervisor.get("pid")
    if state != "stopped" and isinstance(pid, int):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            state = f"{state}, but process {pid} is gone: this file is stale"
        except PermissionError:
            pass  # alive, owned by someone else
    console.print(f"weatherlight pid {pid}: {state} (updated {supervisor.get('updated_at')})")
    table = Table(title=f"Services ({path})")
    for column in ("service", "state", "pid", "restarts", "last exit"):
        table.add_column(column, no_wrap=column in ("state", "pid"))
    table.add_column("since", overflow="fold", ratio=1)
    table.add_column("reason", overflow="fold", ratio=2)
    for service in document["services"]:

        def shown(key: str, service: dict[str, Any] = service) -> str:
            value = service.get(key)
            return "—" if value is None or value == "" else str(value)  # missing is shown as missing

        reason = shown("reason")
        if service.get("next_start_at"):
            reason += f" (next start {service['next_start_at']})"
        table.add_row(
            shown("name"),
            shown("state"),
            shown("pid"),
            shown("restarts"),
            shown("last_exit_code"),
            shown("last_change"),
            reason,
        )
    print_table(table)
