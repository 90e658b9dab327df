"""`esper run`: grow a model on a task, through the run assembly."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from esper.cli.common import (
    HALTED_EXIT,
    INTERRUPTED_EXIT,
    _run_log,
    app,
    console,
    err_console,
    warn,
)
from esper.cli.observe import write_exports
from esper.leyline import (
    CleanupFailed,
    ConfigurationError,
    EsperError,
    resolve_signing_secret,
)

if TYPE_CHECKING:
    from rich.table import Table

    from esper.assembly import RunSettings, RunSummary
    from esper.tolaria.data import Dataset
    from esper.tolaria.run import RunConfig


def _hint_for_deadline_misses(exc: EsperError) -> None:
    """Tell the operator which knobs apply when a run ended on missed decision deadlines."""
    from esper.tamiyo import DeadlineExceeded

    if isinstance(getattr(exc, "last_error", None), DeadlineExceeded):
        err_console.print(
            "the controller missed its decision deadline on every decision for a long streak (a policy "
            "too slow for this machine?): TAMIYO_STEP_TIMEOUT_MS sets the budget, "
            "TOLARIA_MAX_CONSECUTIVE_MISSES the misses in a row a run tolerates"
        )


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
    device: Annotated[
        str | None,
        typer.Option(
            help="Where the run computes: auto (CUDA when available), cpu, cuda or cuda:N; a resumed run "
            "may continue on another device [TOLARIA_DEVICE, auto]."
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

    RUN_DIR/status.json says whether the run is running, completed, failed (with the reason) or halted.
    On Ctrl-C (exit status 130) or a failure, the run directory and the command that continues it are
    printed.
    """
    overrides: dict[str, Any] = {
        "epochs": epochs,
        "seed": seed,
        "decision_interval": decision_interval,
        "batch_size": batch_size,
        "lr": lr,
        "max_params": max_params,
        "host_width": host_width,
        "device": device,
    }
    try:
        start = _checked_start(
            overrides,
            task=task,
            host=host,
            policy=policy,
            policy_checkpoint=policy_checkpoint,
            metrics_port=metrics_port,
            difficulty=difficulty,
            run_dir=run_dir,
            device=device,
            resume=resume,
        )
    except EsperError as exc:
        err_console.print(f"[bold red]esper run failed[/]: {exc}")
        raise typer.Exit(2 if isinstance(exc, ConfigurationError) else 1) from exc
    summary = _train(start, resume=resume, progress=progress)
    _conclude(summary, start.config.run_dir, with_report=with_report)


@dataclass(frozen=True)
class _Start:
    """What a run starts from, every check passed and nothing created yet."""

    settings: RunSettings
    config: RunConfig
    dataset: Dataset
    secret: bytes


def _checked_start(
    overrides: dict[str, Any],
    *,
    task: str,
    host: str,
    policy: str | None,
    policy_checkpoint: Path | None,
    metrics_port: int | None,
    difficulty: float,
    run_dir: Path | None,
    device: str | None,
    resume: bool,
) -> _Start:
    """Everything a start can be refused for, checked before anything is created."""
    from esper.assembly import RunSettings, require_writable, resolve_config
    from esper.nissa.layout import DataLayout
    from esper.tolaria.device import resolve_device
    from esper.tolaria.run import RunConfig, load_task, new_training_run_id, resolve_host

    settings = RunSettings.resolve(
        tolaria={k: v for k, v in overrides.items() if v is not None},
        tamiyo={} if policy_checkpoint is None else {"policy_checkpoint": policy_checkpoint},
        nissa={} if metrics_port is None else {"metrics_port": metrics_port},
    )
    esper_settings = settings.esper
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
            policy=policy or settings.tamiyo.policy,
            difficulty=difficulty,
            run_dir=run_dir or DataLayout(esper_settings.data_dir).runs / run_id,
            catalogue_path=DataLayout(esper_settings.data_dir).catalogue,
            training_run_id=run_id,
            tolaria=settings.tolaria,
            kasmina=settings.kasmina,
        ),
        resume=resume,
    )
    if resume and device is not None:  # the saved config wins, except for where the run computes
        config = replace(config, tolaria=config.tolaria.model_copy(update={"device": device}))
    resolve_device(config.tolaria.device)  # a device this machine lacks is refused before anything
    require_writable(esper_settings.data_dir, "ESPER_DATA_DIR")
    require_writable(config.run_dir, "--run-dir")
    dataset = load_task(config.task, config.host, seed=config.tolaria.seed, difficulty=config.difficulty)
    return _Start(settings, config, dataset, resolve_signing_secret(esper_settings))


def _train(start: _Start, *, resume: bool, progress: bool) -> RunSummary:
    """Build the run through the assembly and train it; a failure or Ctrl-C says where the run is and how
    to continue it, and exits with the status `--help` documents."""
    from esper.assembly import RunAssembly, RunInputs

    run_dir = start.config.run_dir
    summary = None
    assembly = RunAssembly(
        start.settings,
        start.config,
        secret=start.secret,
        inputs=RunInputs(start.dataset),
        resume=resume,
        run_log=_run_log,
        warn=warn,
        on_cleanup_failure=lambda name, exc: err_console.print(
            f"[bold yellow]clean-up step failed[/] ({name}): {type(exc).__name__}: {exc}"
        ),
    )
    try:
        # Each thing opened is closed at the end, newest first; a failing close is reported beside the
        # error that ended the run, never instead of it (and makes the exit status 1 after a success).
        with assembly:
            if assembly.metrics_server is not None:
                console.print(f"metrics: {assembly.metrics_server.url}")
            summary = assembly.train(progress=progress, console=console)
    except CleanupFailed as exc:
        if summary is not None:
            console.print(summary_table(summary))
        err_console.print(f"[bold red]the run finished but its clean-up failed[/]: {exc}")
        raise typer.Exit(1) from exc
    except KeyboardInterrupt as exc:
        err_console.print("[bold red]run interrupted[/]")
        _how_to_resume(run_dir)
        raise typer.Exit(INTERRUPTED_EXIT) from exc
    except EsperError as exc:
        err_console.print(f"[bold red]esper run failed[/]: {exc}")
        _hint_for_deadline_misses(exc)
        _how_to_resume(run_dir)
        raise typer.Exit(1) from exc
    except OSError as exc:  # a read-only or full disk, found while creating or writing the run
        err_console.print(f"[bold red]esper run failed[/]: {exc}")
        _how_to_resume(run_dir)
        raise typer.Exit(1) from exc
    except Exception:  # a bug: its traceback follows, after where the run is and how to continue it
        err_console.print("[bold red]esper run failed[/]")
        _how_to_resume(run_dir)
        raise
    return summary


def _conclude(summary: RunSummary, run_dir: Path, *, with_report: bool) -> None:
    """The summary, each growth step, the report and the exports; a halted run's exit status."""
    console.print(summary_table(summary))
    if summary.growth_steps:
        console.print(growth_table(summary))
    console.print(f"run directory: {run_dir}")
    if with_report:
        from esper.nissa.report import ReportError, write_report

        try:
            console.print(f"report: {write_report(run_dir).markdown}")
        except ReportError as exc:
            err_console.print(f"[bold red]the run finished but its report failed[/]: {exc}")
            raise typer.Exit(1) from exc
        write_exports(run_dir)  # TensorBoard event files and metrics.csv
    if summary.halt is not None:
        err_console.print(
            f"[bold red]run halted[/] at step {summary.steps} by an emergency signal from "
            f"{summary.halt.origin}: {summary.halt.reason}\ncheckpoint written; continue with: "
            f"{resume_command(run_dir)}"
        )
        raise typer.Exit(HALTED_EXIT)


def growth_table(summary: RunSummary) -> Table:
    """Each growth step: what it changed, and the validation accuracy before and after it."""
    from rich.table import Table

    table = Table(title="growth steps", show_header=True)
    for column in ("step", "operation", "target", "outcome", "parameters", "accuracy"):
        table.add_column(column)

    def figure(value: object) -> str:
        return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

    for entry in summary.growth_steps:
        table.add_row(
            str(entry["step"]),
            str(entry["operation"]),
            str(entry["target"]),
            str(entry["outcome"]),
            f"{figure(entry['params_before'])} -> {figure(entry['params_after'])}",
            f"{figure(entry['accuracy_before'])} -> {figure(entry['accuracy_after'])}",
        )
    return table


def resume_command(run_dir: Path) -> str:
    """The exact command that continues the run in `run_dir`."""
    import shlex

    return shlex.join(["esper", "run", "--resume", "--run-dir", str(run_dir)])


def _how_to_resume(run_dir: Path) -> None:
    """After a failure or Ctrl-C: where the run is, and how to continue it (once it had begun)."""
    from esper.nissa.layout import RunLayout

    if not RunLayout(run_dir).config.exists():
        return  # the start failed before training: nothing was kept, nothing to resume
    err_console.print(f"run directory: {run_dir}\ncontinue with: {resume_command(run_dir)}")


def summary_table(summary: RunSummary) -> Table:
    """The summary as a rich table."""
    from rich.table import Table

    figures = summary.to_json()
    table = Table(title=f"run {summary.run_id}", show_header=True)
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key in (
        "task",
        "host",
        "policy",
        "status",
        "epochs",
        "final_val_accuracy",
        "best_val_accuracy",
        "params_initial",
        "params_final",
        "max_params",
        "seeds_germinated",
        "seeds_fossilized",
        "seeds_culled",
        "rollbacks",
        "decisions",
        "decision_deadline_misses",
        "wall_seconds",
    ):
        value = figures.get(key)
        if key == "max_params" and value is None:
            table.add_row(key, "unbounded")
            continue
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    transitions = summary.transitions
    table.add_row("transitions", ", ".join(f"{k} {v}" for k, v in transitions.items()) or "none")
    return table
