"""The `esper` command line: the composition root that builds the parts and wires them together."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

import esper
from esper.cli_observe import print_table, write_exports
from esper.cli_observe import register as register_observing
from esper.leyline import (
    CleanupFailed,
    CleanupStack,
    ConfigurationError,
    EsperError,
    EsperSettings,
    StrictSettings,
    load_settings,
    pb,
    resolve_signing_secret,
)

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from esper.tamiyo import (
        BlueprintMetadataCache,
        Policy,
        PolicyUpdateFeed,
        PolicyUpdateIntake,
        TamiyoService,
    )
    from esper.tamiyo.settings import TamiyoSettings
    from esper.tolaria.controller import Controller

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

console = Console()
err_console = Console(stderr=True)

HALTED_EXIT = 3
RUN_LOG = "esper.log"


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


def _run_log(run_dir: Path) -> Callable[[], None]:
    """During a run, the `esper` loggers write to RUN_DIR/esper.log, and the terminal shows what a person
    acts on (progress, errors, the summary), not internal events, unless --verbose. Returns the undo."""
    log_file = logging.FileHandler(run_dir / RUN_LOG, encoding="utf-8")
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


def _blueprint_metadata(
    tamiyo_settings: TamiyoSettings, cleanup: CleanupStack | None = None
) -> BlueprintMetadataCache:
    """Tamiyo's blueprint metadata cache for this process, for `TamiyoService(blueprint_metadata=...)`.

    Filled from the deployment's catalogue (<ESPER_DATA_DIR>/urza.sqlite3, warmed with every entry) and
    kept fresh by Urza's change notifications on the deployment's bus, polled by a background thread
    (a consumer group of its own, removed with the connections by `cleanup`, or at exit without one).
    """
    import atexit

    from esper.oona import OonaSettings, open_bus
    from esper.tamiyo import BlueprintMetadataCache
    from esper.urza import BlueprintCatalogue, BusChangePublisher, CatalogueChangeFeed, NotificationFailed

    settings = _settings()
    bus = open_bus(settings, load_settings(OonaSettings))
    publisher = BusChangePublisher(bus)
    catalogue = BlueprintCatalogue.open_default(settings.data_dir / "urza.sqlite3", publisher=publisher)
    try:  # announce what an earlier process committed but could not publish (the outbox keeps it if not)
        catalogue.publish_pending()
    except NotificationFailed as exc:
        logging.getLogger("esper.cli").warning("catalogue notifications still pending: %s", exc)
    cache = BlueprintMetadataCache(catalogue, tamiyo_settings, feed_factory=lambda: CatalogueChangeFeed(bus))
    if cleanup is None:
        cleanup = CleanupStack(_log_cleanup_failure)
        atexit.register(cleanup.close)
    cleanup.push("close the blueprint catalogue", catalogue.close)
    cleanup.push("close the catalogue's bus", bus.close)
    cleanup.push("close the blueprint metadata cache", cache.close)
    cache.warm(descriptor.blueprint_id for descriptor in catalogue.list())
    cache.start()
    return cache


@app.command()
def version() -> None:
    """Print Esper's version."""
    console.print(f"esper {esper.__version__}")


def _settings_classes() -> list[type[StrictSettings]]:
    """Every subsystem's settings class, in the order a deployment reads them."""
    from esper.kasmina import KasminaSettings
    from esper.nissa import NissaSettings
    from esper.oona import OonaSettings
    from esper.simic.settings import SimicSettings
    from esper.tamiyo.settings import TamiyoSettings
    from esper.tolaria.settings import TolariaSettings
    from esper.weatherlight import WeatherlightSettings

    return [
        EsperSettings,
        TolariaSettings,
        KasminaSettings,
        TamiyoSettings,
        SimicSettings,
        OonaSettings,
        NissaSettings,
        WeatherlightSettings,
    ]


def _setting_rows(cls: type[StrictSettings]) -> list[tuple[str, str, str]]:
    """(variable, default as a `.env` value, description) for every field of `cls`."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    rows = []
    for name, field in cls.model_fields.items():
        default = _setting_text(field.get_default(call_default_factory=True))
        rows.append((prefix + name.upper(), default, field.description or ""))
    return rows


def env_example() -> str:
    """Every setting of every subsystem with its default, as the text of a `.env` file."""
    lines = [
        "# Every Esper setting with its default (generated by `esper settings --env-example`).",
        "# Copy to .env and uncomment what you change; the environment wins over the file.",
    ]
    for cls in _settings_classes():
        lines += ["", f"# -- {cls.__name__} " + "-" * (70 - len(cls.__name__))]
        for variable, default, description in _setting_rows(cls):
            if description:
                lines.append(f"# {description}")
            lines.append(f"# {variable}={default}")
    return "\n".join(lines) + "\n"


@app.command("settings")
def settings_command(
    as_env: Annotated[
        bool, typer.Option("--env-example", help="Print every setting as a commented .env file instead.")
    ] = False,
) -> None:
    """Show every setting of every subsystem with its resolved value and default.

    Values come from the environment and .env; an invalid one fails here as it would at start."""
    from rich.table import Table

    if as_env:
        console.print(env_example(), end="", markup=False, highlight=False, soft_wrap=True)
        return
    table = Table(title="Esper settings (environment and .env)")
    for column in ("variable", "value", "default", "description"):
        table.add_column(column, overflow="fold")
    for cls in _settings_classes():
        try:
            resolved = load_settings(cls)
        except ConfigurationError as exc:
            err_console.print(f"[bold red]configuration error[/]: {exc}")
            raise typer.Exit(2) from exc
        for (variable, default, description), name in zip(_setting_rows(cls), cls.model_fields, strict=True):
            value = getattr(resolved, name)
            shown = "(set)" if "secret" in name and value is not None else _setting_text(value)
            style = "bold" if shown != default else ""
            table.add_row(variable, f"[{style}]{shown}[/]" if style else shown, default, description)
    print_table(table)


def _setting_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple | list):
        return ",".join(str(item) for item in value)  # sequence settings are read comma-separated
    return str(value)


def _build_controller(
    policy: str,
    secret: bytes,
    policy_checkpoint: Path | None = None,
    durable: _TamiyoRunState | None = None,
    registry: CollectorRegistry | None = None,
    *,
    cleanup: CleanupStack | None = None,
) -> Controller:
    """The one place a run's controller is built: Tamiyo with the chosen policy, bound for Tolaria.

    `gnn` is the heterogeneous GNN: untrained (seeded) weights, or the safetensors checkpoint named by
    `policy_checkpoint` / TAMIYO_POLICY_CHECKPOINT. Its inference worker runs with TAMIYO_CPU_THREADS
    torch threads; the trainer keeps its own budget (TOLARIA_THREADS). Tamiyo's metrics go to `registry`;
    what it opens is closed by `cleanup` (at exit without one).
    """
    from esper.tamiyo import HeuristicPolicy
    from esper.tamiyo.settings import TamiyoSettings
    from esper.tolaria.controller import BoundController

    overrides: dict[str, Any] = {} if policy_checkpoint is None else {"policy_checkpoint": policy_checkpoint}
    tamiyo_settings = load_settings(TamiyoSettings, None, **overrides)
    metadata = _blueprint_metadata(tamiyo_settings, cleanup)
    if policy == "heuristic":
        heuristic = HeuristicPolicy(tamiyo_settings)
        service = _tamiyo_service(durable, tamiyo_settings, heuristic, secret, metadata, registry=registry)
        return BoundController(
            decide=service.evaluate_step,
            save=heuristic.state,
            load=heuristic.restore,
            start=service.submit,
            finish=service.collect,
            release=service.checkpointed,
            rewind=service.rewound,
        )
    if policy == "gnn":
        from esper.tamiyo import GNNPolicy  # PyTorch Geometric loads only for the GNN

        checkpoint = tamiyo_settings.policy_checkpoint
        if checkpoint is not None and not checkpoint.is_file():
            raise ConfigurationError(f"policy checkpoint {checkpoint} does not exist")
        # The policy's graph builder sees the same catalogue entries as the risk gates, and keeps its
        # normaliser statistics in the run's store (restored on --resume).
        inputs: dict[str, Any] = {"blueprint_metadata": metadata}
        if durable is not None:
            inputs["normalizer_store"] = durable.store.normalizer_store()
        gnn = (
            _load_gnn(checkpoint, tamiyo_settings, inputs)
            if checkpoint is not None
            else GNNPolicy(tamiyo_settings, **inputs)
        )
        service = _tamiyo_service(durable, tamiyo_settings, gnn, secret, metadata, registry=registry)
        intake = _policy_intake(durable, service, gnn, secret, tamiyo_settings)
        return BoundController(
            decide=intake.evaluate_step,
            save=intake.export_state,
            load=intake.restore_state,
            rehearse=_announcing_misfit(intake.prepare, service),
            warm_ahead=intake.anticipate,
            start=intake.submit,
            finish=intake.collect,
            release=service.checkpointed,
            rewind=service.rewound,
        )
    raise ConfigurationError(f"unknown policy {policy!r}; available: heuristic, gnn")


def _announcing_misfit(
    prepare: Callable[[pb.SystemStatePacket], None], service: TamiyoService
) -> Callable[[pb.SystemStatePacket], None]:
    """`prepare`, then, the first time the service measured that its policy does not fit the step budget
    on this machine, a warning on the terminal with the figure and what to do (the event is the
    service's)."""
    announced = False

    def rehearse(packet: pb.SystemStatePacket) -> None:
        nonlocal announced
        prepare(packet)
        fit = service.policy_fit
        if fit is not None and not fit.fits and not announced:
            announced = True
            err_console.print(f"[bold yellow]warning[/]: {fit.message}")

    return rehearse


def _load_gnn(checkpoint: Path, settings: TamiyoSettings, inputs: dict[str, Any]) -> Policy:
    """The GNN with the weights of `checkpoint`; a file that is not a readable safetensors checkpoint
    (truncated, say) is a ConfigurationError naming it, whatever the decoder raised."""
    from safetensors import SafetensorError

    from esper.tamiyo import CheckpointIncompatible, GNNPolicy

    try:
        return GNNPolicy.load(checkpoint, settings, **inputs)
    except (SafetensorError, OSError, ValueError, CheckpointIncompatible) as exc:
        raise ConfigurationError(
            f"policy checkpoint {checkpoint} cannot be read ({type(exc).__name__}: {exc})"
        ) from exc


class _TamiyoRunState:
    """A run's durable Tamiyo state: RUN_DIR/tamiyo.sqlite3, the deployment's bus (ESPER_BUS_URL, or the
    embedded bus in ESPER_DATA_DIR) that its outbox publishes field reports and decisions on, and the service
    writing to them. `finish` ends it once: open observation windows close as ABORTED when the run ended,
    and stay open for `esper run --resume` when it stopped early (failure, halt, interrupt)."""

    def __init__(self, run_dir: Path, settings: EsperSettings) -> None:
        from esper.oona import OonaSettings, open_bus
        from esper.tamiyo import TamiyoStore

        self.store = TamiyoStore(run_dir / "tamiyo.sqlite3")
        try:
            self.bus = open_bus(settings, load_settings(OonaSettings))
        except BaseException:
            self.store.close()
            raise
        self.services: list[TamiyoService] = []
        self.feeds: list[PolicyUpdateFeed] = []
        self._finished = False

    def finish(self, *, run_ended: bool) -> None:
        """Close the services (ABORTED reports for open windows if `run_ended`), then the bus and store."""
        if self._finished:
            return
        self._finished = True
        with CleanupStack(_log_cleanup_failure) as steps:
            steps.push("close Tamiyo's store", self.store.close)
            steps.push("close Tamiyo's bus", self.bus.close)
            if run_ended:  # a run that can still be resumed keeps its place on the policy stream
                for feed in self.feeds:
                    steps.push("delete the policy feed's consumer group", feed.remove_group)
            for service in reversed(self.services):
                close = functools.partial(service.close, abort_open_windows=run_ended)
                steps.push("close Tamiyo's service", close)


def _abandon_past_checkpoint(durable: _TamiyoRunState, run_dir: Path, training_run_id: str) -> None:
    """Before Tamiyo starts (and its outbox publishes anything), cut the store's timeline back to the
    checkpoint the run resumes from: decisions taken after it are re-decided by the resumed run, so theirs
    are abandoned (never published from now on, never learned from). Without a checkpoint the run starts
    over, and its whole earlier timeline is abandoned."""
    from esper.tolaria.run import resume_step

    step = resume_step(run_dir)
    cut = durable.store.abandon_after(training_run_id, -1 if step is None else step)
    if cut.decisions or cut.field_reports or cut.already_published:
        err_console.print(
            f"resume from step {step or 0}: abandoned {cut.decisions} decision(s) and {cut.field_reports}"
            " pending field report(s) written after it"
            + (
                f"; {cut.already_published} of them were published before the crash"
                if cut.already_published
                else ""
            )
        )


def _tamiyo_service(
    durable: _TamiyoRunState | None,
    settings: TamiyoSettings,
    policy: Policy,
    secret: bytes,
    metadata: BlueprintMetadataCache,
    *,
    registry: CollectorRegistry | None = None,
) -> TamiyoService:
    """A Tamiyo service that records into the run's store when there is one (P9)."""
    from esper.oona import TelemetryPublisher
    from esper.tamiyo import TamiyoService

    if durable is None:
        return TamiyoService(settings, policy, secret, blueprint_metadata=metadata, registry=registry)
    service = TamiyoService(
        settings,
        policy,
        secret,
        store=durable.store,
        bus=durable.bus,
        blueprint_metadata=metadata,
        registry=registry,
        # Decisions and reports leave only once a durable checkpoint covers them: a resume never finds
        # that Simic learnt from steps it decides again (the trainer's checkpoints call `checkpointed`).
        hold_until_checkpoint=True,
        # HIGH and CRITICAL packets on the emergency stream, the rest on telemetry; a refusal is logged.
        telemetry_sink=TelemetryPublisher(durable.bus),
    )
    durable.services.append(service)
    return service


def _policy_intake(
    durable: _TamiyoRunState | None,
    service: TamiyoService,
    policy: Policy,
    secret: bytes,
    settings: TamiyoSettings,
) -> PolicyUpdateIntake:
    """P3 for a run: policy updates from the deployment's bus, polled between decisions (outside the
    deadline), swapped in with probation; accepted weights are archived in RUN_DIR/policies for --resume."""
    from esper.tamiyo import PolicyUpdateFeed, PolicyUpdateIntake

    if durable is None:
        return PolicyUpdateIntake(service, policy, secret, settings)
    run_dir = durable.store.path.parent
    feed = PolicyUpdateFeed(durable.bus, f"tamiyo-{run_dir.name}")
    durable.feeds.append(feed)
    return PolicyUpdateIntake(
        service,
        policy,
        secret,
        settings,
        feed=feed,
        archive=run_dir / "policies",
        lineage=durable.store,
    )


def _hint_for_deadline_misses(exc: EsperError) -> None:
    """Tell the operator which knobs apply when a run ended on missed decision deadlines."""
    from esper.tamiyo import DeadlineExceeded

    if isinstance(getattr(exc, "last_error", None), DeadlineExceeded):
        err_console.print(
            "the controller missed its decision deadline on every decision for a long streak (a policy "
            "too slow for this machine?): TAMIYO_STEP_TIMEOUT_MS sets the budget, "
            "TOLARIA_MAX_CONSECUTIVE_MISSES the misses in a row a run tolerates"
        )


def _log_cleanup_failure(name: str, exc: Exception) -> None:
    """The clean-up reporter of a process: the failure goes to the log."""
    logging.getLogger("esper.cli").error("clean-up step %r failed: %s: %s", name, type(exc).__name__, exc)


def _run_cleanup_reporter(run_dir: Path) -> Callable[[str, Exception], None]:
    """A run's clean-up reporter: logged, printed, and recorded as a `cleanup_failed` event of the run."""
    from esper.tolaria.records import JsonlLog

    def report(name: str, exc: Exception) -> None:
        _log_cleanup_failure(name, exc)
        err_console.print(f"[bold yellow]clean-up step failed[/] ({name}): {type(exc).__name__}: {exc}")
        events = run_dir / "events.jsonl"
        if not events.exists():  # the run never started: there is no event log to add to
            return
        try:
            JsonlLog(events).append(
                {"kind": "cleanup_failed", "cleanup": name, "reason": f"{type(exc).__name__}: {exc}"}
            )
        except OSError as write_error:  # a full disk: the log line above is all there is
            logging.getLogger("esper.cli").error("cannot record the clean-up failure: %s", write_error)

    return report


def _require_writable(path: Path, what: str) -> None:
    """Refuse a directory the run could not create or write in (read-only, or under a file)."""
    import os

    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigurationError(f"{what} {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigurationError(f"{what} {path}: {existing} is not writable")


class _FreshStart:
    """What a fresh start creates in its run directory, so a start that fails before training (before
    config.json is written) can remove exactly that: the directory if it created it, else the new entries.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.existed = run_dir.exists()
        self.before = set(run_dir.iterdir()) if self.existed else set()

    def undo(self) -> None:
        """Remove what this start created, unless the run began (then it is a run to resume)."""
        import shutil

        if (self.run_dir / "config.json").exists() or not self.run_dir.exists():
            return
        if not self.existed:
            shutil.rmtree(self.run_dir)
            return
        for entry in set(self.run_dir.iterdir()) - self.before:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


@app.command()
def run(
    *,
    task: Annotated[
        str,
        typer.Option(
            help="Task: 'digits' (sklearn), 'generated' (tabular), 'signals' (1-D signals), 'tokens' "
            "(token sequences), or a path to an .npz file."
        ),
    ] = "digits",
    host: Annotated[
        str,
        typer.Option(
            help="Host model: 'mlp', 'cnn' (images), 'conv1d' (sequences [N, L] or [N, C, L]), "
            "'transformer' (token ids), or 'auto' (chosen from the data's shape; the run says which "
            "and why)."
        ),
    ] = "mlp",
    epochs: Annotated[
        int | None, typer.Option(help="Passes over the training split [TOLARIA_EPOCHS, 40].")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of every random choice [TOLARIA_SEED, 0].")] = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="Run directory [<ESPER_DATA_DIR>/runs/<run id>].")
    ] = None,
    policy: Annotated[
        str | None, typer.Option(help="Tamiyo's policy: 'heuristic' or 'gnn' [TAMIYO_POLICY, heuristic].")
    ] = None,
    policy_checkpoint: Annotated[
        Path | None,
        typer.Option(help="Weights of the gnn policy (safetensors) [TAMIYO_POLICY_CHECKPOINT, untrained]."),
    ] = None,
    decision_interval: Annotated[
        int | None,
        typer.Option(help="Training steps between controller decisions [TOLARIA_DECISION_INTERVAL, 20]."),
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size [TOLARIA_BATCH_SIZE, 64].")] = None,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate [TOLARIA_LR, 0.003].")] = None,
    difficulty: Annotated[
        float, typer.Option(help="Difficulty in [0, 1] of the generated, signals and tokens tasks.")
    ] = 0.5,
    max_params: Annotated[
        int | None,
        typer.Option(
            help="Growth budget: the model grows to at most this many parameters (0: unbounded) "
            "[TOLARIA_MAX_PARAMS, 0]."
        ),
    ] = None,
    host_width: Annotated[
        int | None,
        typer.Option(
            help="Width the host starts at: MLP units per layer, first conv channels (the second twice), "
            "Transformer feed-forward units (0: the host's default) [TOLARIA_HOST_WIDTH, 0]."
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in --run-dir from its last checkpoint (its config wins).")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
    with_report: Annotated[
        bool,
        typer.Option(
            "--report/--no-report", help="Write the report with plots into RUN_DIR/report at the end."
        ),
    ] = True,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            help="Serve Prometheus metrics on this port while the run trains (0: any free port) "
            "[NISSA_METRICS_PORT, none]. A snapshot is written to RUN_DIR/metrics.prom at the end either way."
        ),
    ] = None,
) -> None:
    """Grow a model on a task (sklearn's digits by default) and write a run directory.

    The run listens for emergency HALT signals on the deployment's bus (ESPER_BUS_URL; the embedded bus
    in ESPER_DATA_DIR by default): on one it checkpoints, logs the reason and exits with status 3; continue
    it with --resume. A run that diverges broadcasts a HALT to every process on the bus.
    """
    from prometheus_client import CollectorRegistry

    from esper.kasmina import KasminaSettings
    from esper.nissa import MetricsServer, NissaSettings, RunMetrics, write_snapshot
    from esper.oona import OonaSettings
    from esper.tamiyo.settings import TamiyoSettings
    from esper.tolaria.emergency import BusEmergencyChannel
    from esper.tolaria.run import (
        RunConfig,
        load_task,
        new_training_run_id,
        resolve_config,
        resolve_host,
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
        "max_params": max_params,
        "host_width": host_width,
    }
    try:
        # Everything a start can be refused for is checked before anything is created.
        tolaria = load_settings(
            TolariaSettings, None, **{k: v for k, v in overrides.items() if v is not None}
        )
        kasmina = load_settings(KasminaSettings)
        tamiyo = load_settings(TamiyoSettings)
        oona = load_settings(OonaSettings)
        nissa = load_settings(
            NissaSettings, None, **({} if metrics_port is None else {"metrics_port": metrics_port})
        )
        if resume and run_dir is None:
            raise ConfigurationError("--resume needs --run-dir")
        run_id = new_training_run_id()
        if not resume:
            chosen, why = resolve_host(task, host)
            if host == "auto":
                console.print(f"host: {chosen} ({why})")
            host = chosen
        config = resolve_config(
            RunConfig(
                task=task,
                host=host,
                policy=policy or tamiyo.policy,
                difficulty=difficulty,
                run_dir=run_dir or settings.data_dir / "runs" / run_id,
                catalogue_path=settings.data_dir / "urza.sqlite3",
                training_run_id=run_id,
                tolaria=tolaria,
                kasmina=kasmina,
            ),
            resume=resume,
        )
        _require_writable(settings.data_dir, "ESPER_DATA_DIR")
        _require_writable(config.run_dir, "--run-dir")
        dataset = load_task(config.task, config.host, seed=config.tolaria.seed, difficulty=config.difficulty)
    except EsperError as exc:
        err_console.print(f"[bold red]esper run failed[/]: {exc}")
        raise typer.Exit(2 if isinstance(exc, ConfigurationError) else 1) from exc
    summary: dict[str, Any] = {}
    try:
        # Each thing opened is closed at the end, newest first; a failing close is reported beside the
        # error that ended the run, never instead of it (and makes the exit status 1 after a success).
        with CleanupStack(_run_cleanup_reporter(config.run_dir)) as cleanup:
            if not resume:  # a start that fails before training removes what it created, and only that
                cleanup.push("remove what the failed start created", _FreshStart(config.run_dir).undo)
            config.run_dir.mkdir(parents=True, exist_ok=True)
            cleanup.push("close the run's log", _run_log(config.run_dir))
            secret = resolve_signing_secret(settings)
            registry = CollectorRegistry()  # this run's metrics only, never the process-global registry
            run_metrics = RunMetrics(registry, config.training_run_id)
            server = (
                None
                if nissa.metrics_port is None
                else MetricsServer(registry, nissa.metrics_port, nissa.metrics_address)
            )
            if server is not None:
                cleanup.push("stop the metrics server", server.close)
                console.print(f"metrics: {server.url}")
            # The final figures (outbox counters included), also when the run failed; a start that failed
            # before training has none.
            cleanup.push(
                "write metrics.prom",
                lambda: (
                    write_snapshot(registry, config.run_dir / "metrics.prom")
                    if (config.run_dir / "config.json").exists()
                    else None
                ),
            )
            durable = _TamiyoRunState(config.run_dir, settings)
            if resume:
                _abandon_past_checkpoint(durable, config.run_dir, config.training_run_id)
            # Windows are aborted when the run ended; a run that stopped early (failure, halt, interrupt)
            # leaves them open for --resume.
            cleanup.push(
                "close Tamiyo's state",
                lambda: durable.finish(run_ended=summary.get("status") == "completed"),
            )
            controller = _build_controller(
                config.policy, secret, policy_checkpoint, durable, registry, cleanup=cleanup
            )
            channel = BusEmergencyChannel.open(
                settings,
                oona,
                training_run_id=config.training_run_id,
                origin=f"tolaria {config.training_run_id}",
            )
            cleanup.push("close the emergency channel", channel.close)
            summary = run_experiment(
                config,
                controller,
                secret,
                resume=resume,
                console=console,
                progress=progress,
                emergency=channel,
                dataset=dataset,
                on_epoch=lambda report: run_metrics.observe(
                    epoch=report.epoch,
                    step=report.step,
                    validation_accuracy=report.validation_accuracy,
                    validation_loss=report.validation_loss,
                    parameters=report.parameters,
                    active_seeds=report.active_seeds,
                    fossilized_seeds=report.fossilized_seeds,
                ),
            )
            run_metrics.finish(
                step=summary["steps"],
                validation_accuracy=summary["final_val_accuracy"],
                validation_loss=summary["final_val_loss"],
                parameters=summary["params_final"],
                fossilized_seeds=summary["seeds_fossilized"],
            )
    except CleanupFailed as exc:
        console.print(summary_table(summary))
        err_console.print(f"[bold red]the run finished but its clean-up failed[/]: {exc}")
        raise typer.Exit(1) from exc
    except EsperError as exc:
        err_console.print(f"[bold red]esper run failed[/]: {exc}")
        _hint_for_deadline_misses(exc)
        raise typer.Exit(1) from exc
    except OSError as exc:  # a read-only or full disk, found while creating or writing the run
        err_console.print(f"[bold red]esper run failed[/]: {exc}")
        raise typer.Exit(1) from exc
    console.print(summary_table(summary))
    console.print(f"run directory: {config.run_dir}")
    if with_report:
        from esper.tolaria.report import ReportError, write_report

        try:
            console.print(f"report: {write_report(config.run_dir).markdown}")
        except ReportError as exc:
            err_console.print(f"[bold red]the run finished but its report failed[/]: {exc}")
            raise typer.Exit(1) from exc
        write_exports(config.run_dir)  # TensorBoard event files and metrics.csv
    if summary["status"] == "halted":
        halt = summary["halt"]
        err_console.print(
            f"[bold red]run halted[/] at step {summary['steps']} by an emergency signal from "
            f"{halt['origin']}: {halt['reason']}\ncheckpoint written; continue with: "
            f"esper run --resume --run-dir {config.run_dir}"
        )
        raise typer.Exit(HALTED_EXIT)


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
    status: Annotated[
        bool, typer.Option("--status", help="Print the state of this node's services and exit.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="With --status: print the health file as JSON.")
    ] = False,
) -> None:
    """Run this node's long-lived services (Simic's learner by default) under Weatherlight, the supervisor.

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

    from esper.oona import BusError, OonaSettings, open_bus
    from esper.tolaria.emergency import BusEmergencyChannel
    from esper.weatherlight import SERVICES, Supervisor, WeatherlightSettings
    from esper.weatherlight.events import BusEventPublisher
    from esper.weatherlight.supervisor import stop_on_signals

    settings = _settings()
    try:
        overrides: dict[str, Any] = {"services": tuple(services)} if services else {}
        weatherlight = load_settings(WeatherlightSettings, None, **overrides)
        oona = load_settings(OonaSettings)
    except ConfigurationError as exc:
        err_console.print(f"[bold red]configuration error[/]: {exc}")
        raise typer.Exit(2) from exc
    health_path = weatherlight.health_path(settings)
    if status:
        _print_health(health_path, as_json)
        return
    try:
        bus = open_bus(settings, oona)
    except (ConfigurationError, BusError) as exc:
        err_console.print(f"[bold red]cannot open the bus[/]: {exc}")
        raise typer.Exit(2 if isinstance(exc, ConfigurationError) else 1) from exc
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
        [SERVICES[name] for name in weatherlight.services],
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


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="The run directory (the one `esper run` wrote).")],
) -> None:
    """Render a run directory's report: accuracy, parameter and lifecycle plots (PNG) and report.md,
    written to RUN_DIR/report."""
    from esper.tolaria.report import ReportError, write_report

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

    from esper.leyline import ContractViolation, from_short_name, pb, short_name
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
    path = run_dir / "tamiyo.sqlite3"
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
    print_table(table)


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


def _change_catalogue(verb: str, blueprint_id: str, reason: str | None) -> None:
    """Quarantine (with `reason`) or release a blueprint, and publish the change on the bus."""
    from esper.oona import BusError, OonaSettings, open_bus
    from esper.urza import BlueprintCatalogue, BusChangePublisher, NotificationFailed, UrzaError

    settings = _settings()
    try:
        bus = open_bus(settings, load_settings(OonaSettings))
    except (ConfigurationError, BusError) as exc:
        err_console.print(f"[bold red]cannot open the bus[/]: {exc}")
        raise typer.Exit(2 if isinstance(exc, ConfigurationError) else 1) from exc
    path = settings.data_dir / "urza.sqlite3"
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


def _simic_learner(state_dir: Path | None, policy_checkpoint: Path | None, bus: Any | None) -> Any:
    """Simic's learner: the policy of its state directory (or the checkpoint, or an untrained GNN)."""
    from esper.simic.settings import SimicSettings
    from esper.simic.state import SimicState
    from esper.simic.trainer import SimicTrainer, bus_publisher
    from esper.tamiyo import GNNPolicy
    from esper.tamiyo.settings import TamiyoSettings

    settings = _settings()
    tamiyo_settings = load_settings(TamiyoSettings)
    state = SimicState(state_dir or settings.data_dir / "simic")
    saved = state.load_policy(tamiyo_settings)
    if saved is not None:
        policy, sequence = saved
    elif policy_checkpoint is not None:
        policy, sequence = GNNPolicy.load(policy_checkpoint, tamiyo_settings), 0
    else:
        policy, sequence = GNNPolicy(tamiyo_settings), 0
    return SimicTrainer(
        load_settings(SimicSettings),
        tamiyo_settings,
        policy,
        resolve_signing_secret(settings),
        sequence=sequence,
        publish=bus_publisher(bus) if bus is not None else None,
        state=state,
        # Graphs are rebuilt with the catalogue entries Tamiyo's builder sees.
        blueprint_metadata=_blueprint_metadata(tamiyo_settings),
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
        str, typer.Option(help="auto (PPO when enough GNN decisions), ppo or imitation.")
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

    from esper.oona import BusError, EmbeddedBus, OonaSettings, open_bus
    from esper.simic.trainer import offline_records
    from esper.simic.transitions import RecordCollector

    if mode not in ("auto", "ppo", "imitation"):
        err_console.print(f"[bold red]unknown mode[/] {mode!r}: use auto, ppo or imitation")
        raise typer.Exit(2)
    settings = _settings()
    oona = load_settings(OonaSettings)
    collector = RecordCollector()
    deployment = None
    try:
        for source in sources:
            bus_file = source if source.is_file() else source / "bus.sqlite3"
            if bus_file.is_file():
                local = EmbeddedBus(bus_file, oona)
                try:
                    offline_records(local, collector)
                finally:
                    local.close()
            elif (source / "config.json").is_file():
                run_id = str(json.loads((source / "config.json").read_text())["training_run_id"])
                deployment = deployment or open_bus(settings, oona)
                offline_records(deployment, collector, training_run_id=run_id)
            else:
                raise ConfigurationError(f"{source} is neither a run directory nor a bus file")
        publisher = None
        if publish:
            deployment = deployment or open_bus(settings, oona)
            publisher = deployment
        learner = _simic_learner(state_dir, policy_checkpoint, publisher)
        result = learner.run_round(collector.transitions(learner.settings), mode=mode)  # type: ignore[arg-type]
    except (EsperError, BusError) as exc:
        err_console.print(f"[bold red]esper simic train failed[/]: {exc}")
        raise typer.Exit(1) from exc
    finally:
        if deployment is not None:
            deployment.close()
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
    current round."""
    import signal
    import threading

    from esper.oona import OonaSettings, open_bus
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
    try:
        learner = _simic_learner(state_dir, policy_checkpoint, bus)
        console.print(f"simic serving {learner.policy.version} (sequence {learner.sequence}); group {group}")
        serve_rounds(
            bus,
            learner,
            group=group,
            max_rounds=max_rounds,
            should_stop=terminated.is_set,
            on_round=lambda r: _print_round(r, as_json),
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
        bus.close()


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
    print_table(table)


@policy_app.command("show")
def policy_show(
    state_dir: Annotated[Path | None, typer.Option(help="Simic's state [<ESPER_DATA_DIR>/simic].")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object, not tables.")] = False,
) -> None:
    """Show the current policy version, lineage and validation figures (from Simic's state directory)."""
    import json

    from rich.table import Table

    from esper.simic.state import SimicState
    from esper.tamiyo import PolicyUpdateRejected, read_payload_header

    root = state_dir or _settings().data_dir / "simic"
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


def main() -> None:
    """Entry point of the `esper` script."""
    app()
