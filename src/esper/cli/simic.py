"""`esper simic`: learn Tamiyo's policy offline (`train`) or from the bus (`serve`), fed by actors
(`actor`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from esper.cli.common import (
    HALTED_EXIT,
    _log_cleanup_failure,
    _run_log,
    _settings,
    console,
    err_console,
    simic_app,
    warn,
)
from esper.leyline import (
    CleanupStack,
    ConfigurationError,
    EsperError,
    load_settings,
    resolve_signing_secret,
)


def _simic_learner(
    state_dir: Path | None, policy_checkpoint: Path | None, bus: Any, cleanup: CleanupStack, *, publish: bool
) -> Any:
    """Simic's learner: the policy of its state directory (or the checkpoint, or an untrained GNN),
    publishing its accepted updates on `bus` if `publish`. Its graphs are built with the catalogue
    entries Tamiyo's builder sees (a metadata cache kept fresh from `bus`, closed by `cleanup`)."""
    from esper.assembly.tamiyo import metadata_cache, open_catalogue
    from esper.nissa.layout import DataLayout
    from esper.simic.settings import SimicSettings
    from esper.simic.state import SimicState
    from esper.simic.trainer import SimicTrainer, bus_publisher
    from esper.tamiyo import GNNPolicy
    from esper.tamiyo.settings import TamiyoSettings

    settings = _settings()
    tamiyo_settings = load_settings(TamiyoSettings)
    state = SimicState(state_dir or DataLayout(settings.data_dir).simic)
    saved = state.load_policy(tamiyo_settings)
    if saved is not None:
        policy, sequence = saved
    elif policy_checkpoint is not None:
        policy, sequence = GNNPolicy.load(policy_checkpoint, tamiyo_settings), 0
    else:
        policy, sequence = GNNPolicy(tamiyo_settings), 0
    catalogue = open_catalogue(DataLayout(settings.data_dir).catalogue, bus, cleanup)
    return SimicTrainer(
        load_settings(SimicSettings),
        tamiyo_settings,
        policy,
        resolve_signing_secret(settings),
        sequence=sequence,
        publish=bus_publisher(bus) if publish else None,
        state=state,
        blueprint_metadata=metadata_cache(catalogue, tamiyo_settings, bus, cleanup),
    )


def _print_round(result: Any, as_json: bool) -> None:
    import json

    if as_json:
        typer.echo(json.dumps(result.to_json()))
        return
    verdict = "[green]published[/]" if result.published else "[yellow]not published[/]"
    console.print(
        f"round ({result.mode}): {verdict} {result.version or '-'} (sequence {result.sequence or '-'}, "
        f"parent {result.parent_version}); {result.transitions} transitions, {result.on_policy} on-policy, "
        f"{result.heuristic} heuristic; skipped {result.skipped or 'none'}"
    )
    for reason in result.reasons:
        console.print(f"  reason: {reason}")
    for name, value in sorted(result.metrics.items()):
        console.print(f"  {name} = {value:.4g}")


@simic_app.command("train")
def simic_train(
    *,
    sources: Annotated[
        list[Path],
        typer.Option(
            "--from",
            help="A run directory (its bus.sqlite3, else the deployment bus filtered to the run's id) or an "
            "embedded bus file. Repeat for several runs.",
        ),
    ],
    mode: Annotated[
        str,
        typer.Option(
            help="auto (PPO when enough GNN decisions), ppo, imitation (the heuristic's decisions) or distil "
            "(every decision given, whichever policy made it: give it the runs that scored best)."
        ),
    ] = "auto",
    state_dir: Annotated[Path | None, typer.Option(help="Simic's state [<ESPER_DATA_DIR>/simic].")] = None,
    policy_checkpoint: Annotated[
        Path | None, typer.Option(help="Starting weights when the state directory has none [untrained].")
    ] = None,
    publish: Annotated[
        bool, typer.Option("--publish/--no-publish", help="Publish an accepted update on the deployment bus.")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the round as one JSON object.")] = False,
) -> None:
    """Train one round offline from recorded runs; a candidate that passes validation is signed, saved
    in the state directory and (with --publish) published for every running Tamiyo."""
    import json

    from esper.nissa.layout import RunLayout
    from esper.oona import BusError, EmbeddedBus, OonaSettings, open_bus
    from esper.simic.trainer import offline_records
    from esper.simic.transitions import RecordCollector

    if mode not in ("auto", "ppo", "imitation", "distil"):
        err_console.print(f"[bold red]unknown mode[/] {mode!r}: use auto, ppo, imitation or distil")
        raise typer.Exit(2)
    settings = _settings()
    oona = load_settings(OonaSettings)
    collector = RecordCollector()
    try:
        with CleanupStack(_log_cleanup_failure) as cleanup:
            deployment = open_bus(settings, oona)
            cleanup.push("close the bus", deployment.close)
            for source in sources:
                bus_file = source if source.is_file() else RunLayout(source).bus
                if bus_file.is_file():
                    local = EmbeddedBus(bus_file, oona)
                    try:
                        offline_records(local, collector)
                    finally:
                        local.close()
                elif RunLayout(source).config.is_file():
                    run_id = str(json.loads(RunLayout(source).config.read_text())["training_run_id"])
                    offline_records(deployment, collector, training_run_id=run_id)
                else:
                    raise ConfigurationError(f"{source} is neither a run directory nor a bus file")
            learner = _simic_learner(state_dir, policy_checkpoint, deployment, cleanup, publish=publish)
            result = learner.run_round(collector.transitions(learner.settings), mode=mode)  # type: ignore[arg-type]
    except (EsperError, BusError) as exc:
        err_console.print(f"[bold red]esper simic train failed[/]: {exc}")
        raise typer.Exit(1) from exc
    _print_round(result, as_json)


@simic_app.command("serve")
def simic_serve(
    state_dir: Annotated[Path | None, typer.Option(help="Simic's state [<ESPER_DATA_DIR>/simic].")] = None,
    policy_checkpoint: Annotated[
        Path | None, typer.Option(help="Starting weights when the state directory has none [untrained].")
    ] = None,
    group: Annotated[str, typer.Option(help="Consumer group on the decision and report streams.")] = "simic",
    max_rounds: Annotated[int | None, typer.Option(help="Stop after this many rounds [never].")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print each round as one JSON object.")] = False,
) -> None:
    """Consume decisions and field reports from the bus, train a round every SIMIC_ROUND_MIN_NEW_REPORTS
    new reports, and publish the updates that pass validation. Ctrl-C or SIGTERM stops it after the
    current round.

    Every record is written to the state directory's records.sqlite3 before it is acked on the bus, once
    per command id: a learner killed at any point restarts with every record it took off the bus, and a
    record delivered twice is held (and counted toward a round) once."""
    import signal
    import threading

    from esper.nissa.layout import DataLayout
    from esper.oona import OonaSettings, open_bus
    from esper.simic.records import RecordStore
    from esper.simic.state import SimicState
    from esper.simic.trainer import serve as serve_rounds

    settings = _settings()
    try:
        bus = open_bus(settings, load_settings(OonaSettings))
    except EsperError as exc:
        err_console.print(f"[bold red]cannot open the bus[/]: {exc}")
        raise typer.Exit(1) from exc
    # SIGTERM (how Weatherlight stops a service) ends the loop like Ctrl-C, so the bus is closed cleanly.
    terminated = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda _signum, _frame: terminated.set())
    cleanup = CleanupStack(_log_cleanup_failure)
    cleanup.push("close the bus", bus.close)
    try:
        learner = _simic_learner(state_dir, policy_checkpoint, bus, cleanup, publish=True)
        store = RecordStore(SimicState(state_dir or DataLayout(settings.data_dir).simic).records_path)
        cleanup.push("close Simic's record store", store.close)
        console.print(
            f"simic serving {learner.policy.version} (sequence {learner.sequence}); group {group}; "
            f"{store.count('decision')} decision(s) and {store.count('field_report')} field report(s) held"
        )
        serve_rounds(
            bus,
            learner,
            group=group,
            max_rounds=max_rounds,
            should_stop=terminated.is_set,
            on_round=lambda r: _print_round(r, as_json),
            store=store,
        )
        if terminated.is_set():
            console.print("simic stopped (SIGTERM)")
    except KeyboardInterrupt:
        console.print("simic stopped")
    except EsperError as exc:
        err_console.print(f"[bold red]esper simic serve failed[/]: {exc}")
        raise typer.Exit(1) from exc
    finally:
        signal.signal(signal.SIGTERM, previous)
        cleanup.close()


@simic_app.command("report")
def simic_report(
    state_dir: Annotated[Path | None, typer.Option(help="Simic's state [<ESPER_DATA_DIR>/simic].")] = None,
    out: Annotated[Path | None, typer.Option(help="Where the PNGs go [<state dir>/report].")] = None,
) -> None:
    """Plot the learner's rounds (lineage.jsonl): the critic's explained variance, per-head entropies, KL
    and clip fraction, and the losses, one PNG each."""
    from esper.nissa.layout import DataLayout
    from esper.simic.report import write_simic_report
    from esper.simic.state import SimicState

    state = SimicState(state_dir or DataLayout(_settings().data_dir).simic)
    try:
        written = write_simic_report(state, out or state.root / "report")
    except EsperError as exc:
        err_console.print(f"[bold red]no report[/]: {exc}")
        raise typer.Exit(1) from exc
    for path in written:
        console.print(str(path))


@simic_app.command("actor")
def simic_actor(
    *,
    actor_id: Annotated[
        str, typer.Option(help="This actor's name: its state is <ESPER_DATA_DIR>/actors/<actor id>/.")
    ] = "actor-0",
    max_episodes: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Stop once this many episodes are completed (restarts included; 0: never) "
            "[ACTOR_MAX_EPISODES, 0].",
        ),
    ] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Epochs per episode [ACTOR_EPOCHS, 6].")] = None,
    decision_interval: Annotated[
        int | None,
        typer.Option(min=1, help="Training steps between decisions [ACTOR_DECISION_INTERVAL, 10]."),
    ] = None,
    families: Annotated[
        list[str] | None,
        typer.Option(
            "--family",
            help="A task family to draw episodes from; repeat for several [ACTOR_FAMILIES, all]: generated "
            "(MLP), signals (conv1d), digits (CNN), tokens (Transformer).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print each episode as one JSON object.")] = False,
) -> None:
    """Run episodes for Simic, one after another: short training runs built as `esper run` builds them,
    on the deployment's bus, so that their decisions and field reports reach `esper simic serve` and their
    GNN follows the policy updates it publishes.

    Each episode's task is drawn from the actor id and the episode's index (ACTOR_SEED): a family, a
    difficulty in [ACTOR_DIFFICULTY_MIN, ACTOR_DIFFICULTY_MAX], a data seed and a growth budget of
    ACTOR_BUDGET_MIN to ACTOR_BUDGET_MAX times the host's starting parameters. Progress is kept in
    <ESPER_DATA_DIR>/actors/<actor id>/actor.json and each episode's run in .../runs/<run id>: an actor
    killed mid-episode resumes that run from its last checkpoint when started again. `esper serve
    --actors N` runs N of them (actor-0 ...) under Weatherlight. SIGTERM or Ctrl-C stops it; the episode
    in progress resumes on the next start. An emergency HALT stops it with exit status 3.
    """
    import dataclasses
    import json
    import signal
    from typing import NoReturn

    from esper.assembly.actor import Actor, EpisodeHalted, EpisodeResult
    from esper.simic.actor_settings import ActorSettings

    settings = _settings()
    overrides: dict[str, Any] = {
        "epochs": epochs,
        "decision_interval": decision_interval,
        "families": tuple(families) if families else None,
        "max_episodes": max_episodes,
    }
    try:
        actor_settings = load_settings(
            ActorSettings, None, **{k: v for k, v in overrides.items() if v is not None}
        )
        actor = Actor(
            actor_id,
            actor_settings,
            settings,
            resolve_signing_secret(settings),
            assembly_options={
                "run_log": _run_log,
                "warn": warn,
                "on_cleanup_failure": lambda name, exc: err_console.print(
                    f"[bold yellow]clean-up step failed[/] ({name}): {type(exc).__name__}: {exc}"
                ),
            },
        )
        state = actor.state()
    except EsperError as exc:
        err_console.print(f"[bold red]esper simic actor failed[/]: {exc}")
        raise typer.Exit(2 if isinstance(exc, ConfigurationError) else 1) from exc

    def stop(_signum: int, _frame: object) -> NoReturn:
        # Stops the episode where it is, as Ctrl-C does: its run is marked halted and resumes later.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    def report(result: EpisodeResult) -> None:
        if as_json:
            typer.echo(json.dumps(dataclasses.asdict(result), sort_keys=True))
            return
        if result.status == "diverged":
            warn(
                f"{actor_id} episode {result.plan.index} ({result.plan.describe()}): run "
                f"{result.plan.training_run_id} {result.reason}; next episode"
            )
            return
        console.print(
            f"{actor_id} episode {result.plan.index} ({result.plan.describe()}): run "
            f"{result.plan.training_run_id} {result.status}{' (resumed)' if result.resumed else ''}, "
            f"{result.steps} steps, {result.decisions} decisions, accuracy {result.final_val_accuracy:.3f}, "
            f"{result.params_initial} -> {result.params_final} parameters, {result.wall_seconds:.1f} s"
        )

    current = state.current
    console.print(
        f"{actor_id}: {state.completed} episode(s) completed"
        + (f"; resuming episode {current.index} (run {current.training_run_id})" if current else "")
    )
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        done = actor.run(max_episodes=actor_settings.max_episodes or None, on_episode=report)
    except KeyboardInterrupt:
        console.print(f"{actor_id} stopped; the episode in progress resumes on the next start")
        return
    except EpisodeHalted as exc:
        err_console.print(f"[bold red]{actor_id} halted[/]: {exc}")
        raise typer.Exit(HALTED_EXIT) from exc
    except EsperError as exc:
        err_console.print(f"[bold red]esper simic actor failed[/]: {exc}")
        raise typer.Exit(1) from exc
    finally:
        signal.signal(signal.SIGTERM, previous)
    console.print(f"{actor_id}: {done} episode(s) run; {actor.state().completed} completed in all")
