"""`esper run` as a recipe: resolve the config, build data, host, catalogue, seeds and trainer, train,
write the run directory and its summary. The controller is built by the caller (the composition root)."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from esper.kasmina import KasminaSettings, SeedManager
from esper.leyline import SYSTEM_CLOCK, CleanupStack, EsperError, SignatureVerifier
from esper.tolaria.checkpoint import CheckpointStore
from esper.tolaria.controller import Controller
from esper.tolaria.data import (
    Dataset,
    Layout,
    inspect_npz,
    load_digits,
    load_npz,
    make_signals,
    make_task,
    make_tokens,
)
from esper.tolaria.emergency import EmergencyChannel
from esper.tolaria.growth_steps import growth_steps
from esper.tolaria.hosts import HOST_KINDS, build_host
from esper.tolaria.records import RunDirectory
from esper.tolaria.settings import TolariaSettings
from esper.tolaria.trainer import EpochReport, Trainer, check_checkpoint
from esper.urza import BlueprintCatalogue


class RunConfigError(EsperError):
    """A run cannot start with this configuration (or resume from this directory)."""


@dataclass(frozen=True)
class RunConfig:
    """Everything a run was started with; written to `config.json` and read back on resume."""

    task: str
    host: str
    policy: str
    difficulty: float
    run_dir: Path
    catalogue_path: Path
    training_run_id: str
    tolaria: TolariaSettings
    kasmina: KasminaSettings

    def to_json(self) -> dict[str, Any]:
        """The resolved configuration as JSON."""
        return {
            "task": self.task,
            "host": self.host,
            "policy": self.policy,
            "difficulty": self.difficulty,
            "run_dir": str(self.run_dir),
            "catalogue_path": str(self.catalogue_path),
            "training_run_id": self.training_run_id,
            "tolaria": self.tolaria.model_dump(mode="json"),
            "kasmina": self.kasmina.model_dump(mode="json"),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunConfig:
        """Inverse of `to_json`."""
        return cls(
            task=str(data["task"]),
            host=str(data["host"]),
            policy=str(data["policy"]),
            difficulty=float(data["difficulty"]),
            run_dir=Path(data["run_dir"]),
            catalogue_path=Path(data["catalogue_path"]),
            training_run_id=str(data["training_run_id"]),
            tolaria=TolariaSettings(**data["tolaria"]),
            kasmina=KasminaSettings(**data["kasmina"]),
        )


def new_training_run_id() -> str:
    """A fresh run id."""
    return f"run-{uuid.uuid4().hex[:12]}"


GENERATED_TASKS = ("generated", "signals", "tokens")
_LAYOUTS: dict[str, Layout] = {"mlp": "flat", "cnn": "image", "conv1d": "sequence", "transformer": "tokens"}
# Which hosts can take each bundled task.
_TASK_HOSTS: dict[str, tuple[str, ...]] = {
    "digits": ("mlp", "cnn"),
    "generated": ("mlp",),
    "signals": ("conv1d", "mlp"),
    "tokens": ("transformer",),
}


def resolve_host(task: str, host: str) -> tuple[str, str]:
    """The host for `task` and why: `host` itself unless it is "auto", which reads the data's shape.

    Images (digits, or .npz samples [C, H, W] or square [H, W]) get the 2-D CNN, sequences (signals, or
    .npz samples [C, L]) the 1-D CNN, token ids (tokens, or an .npz that declares a `vocab_size`) the
    Transformer, and everything else the MLP. Flat samples [L] go to the MLP even when they are a signal:
    a flat array says nothing about whether its features are ordered (pass --host conv1d when they are).
    """
    if host != "auto":
        if host not in HOST_KINDS:
            raise RunConfigError(f"unknown host {host!r}: use auto or one of {', '.join(HOST_KINDS)}")
        return host, "chosen"
    if task in _TASK_HOSTS:
        chosen = _TASK_HOSTS[task][-1] if task == "digits" else _TASK_HOSTS[task][0]
        return chosen, f"the {task} task's own host"
    if not task.endswith(".npz"):
        raise RunConfigError(
            f"unknown task {task!r}: use digits, {', '.join(GENERATED_TASKS)} or an .npz file"
        )
    shape = inspect_npz(Path(task))
    sample = shape.sample_shape
    if shape.declares_vocab:
        return "transformer", "the file declares a vocab_size: its samples are token ids"
    if len(sample) == 3:
        return "cnn", f"samples {sample} are images [C, H, W]"
    if len(sample) == 2 and sample[0] == sample[1]:
        return "cnn", f"samples {sample} are square: an image [H, W]"
    if len(sample) == 2:
        return "conv1d", f"samples {sample} are sequences [C, L]"
    return "mlp", (
        f"samples {sample} are flat features: a flat array does not say its features are ordered "
        "(--host conv1d treats them as one signal)"
    )


def load_task(task: str, host: str, *, seed: int, difficulty: float) -> Dataset:
    """The dataset for `task` ("digits", "generated", "signals", "tokens" or a path to an .npz file),
    shaped for `host`."""
    if host not in _LAYOUTS:
        raise RunConfigError(f"unknown host {host!r}: use one of {', '.join(HOST_KINDS)}")
    if task in _TASK_HOSTS and host not in _TASK_HOSTS[task]:
        raise RunConfigError(
            f"the {task} task does not fit the {host} host; use --host {' or '.join(_TASK_HOSTS[task])}"
        )
    if task == "digits":
        return load_digits(seed, image=host == "cnn")
    if task == "generated":
        return make_task(difficulty, seed)
    if task == "signals":
        return make_signals(difficulty, seed)
    if task == "tokens":
        return make_tokens(difficulty, seed)
    if task.endswith(".npz"):
        return load_npz(Path(task), seed, layout=_LAYOUTS[host])
    raise RunConfigError(f"unknown task {task!r}: use digits, {', '.join(GENERATED_TASKS)} or an .npz file")


def resolve_config(config: RunConfig, *, resume: bool) -> RunConfig:
    """The config to run: `config` for a fresh run, the run directory's own on resume.

    On resume the directory given is the run, wherever it lies now: a run directory that was moved keeps
    training where it is (the `run_dir` its config.json recorded is where it was started)."""
    path = config.run_dir / "config.json"
    if resume:
        if not path.exists():
            raise RunConfigError(f"cannot resume: {path} does not exist")
        try:
            saved = RunConfig.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RunConfigError(f"cannot resume: {path} is not a run configuration: {exc}") from exc
        return replace(saved, run_dir=config.run_dir)
    if path.exists():
        raise RunConfigError(f"{config.run_dir} already holds a run; use --resume or another --run-dir")
    return config


def resume_step(run_dir: Path) -> int | None:
    """The step a resume of `run_dir` continues from: that of the newest checkpoint the trainer would
    restore (damaged ones skipped the same way), or None when there is none."""
    store = CheckpointStore(RunDirectory(run_dir).checkpoint_dir)
    checkpoint = store.latest(check=lambda found: check_checkpoint(store.directory, found))
    return None if checkpoint is None else checkpoint.step


def run_experiment(
    config: RunConfig,
    controller: Controller,
    secret: bytes,
    *,
    resume: bool = False,
    console: Console | None = None,
    progress: bool = True,
    emergency: EmergencyChannel | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
    dataset: Dataset | None = None,
) -> dict[str, Any]:
    """Train as `config` says under `controller`; returns (and writes) the summary.

    `on_epoch` sees every epoch's figures (the progress display does too), e.g. to export them as metrics.
    `dataset` is the config's task when the caller has loaded it already (to validate it before starting).
    The data is loaded and everything built before `config.json` is written: a run directory holds a run
    only once training can begin.

    With an `emergency` channel the run obeys HALT signals: it checkpoints and stops early, and the
    summary says `"status": "halted"` with the signal's reason (resume it with `resume=True`)."""
    started = time.monotonic()
    settings = config.tolaria
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    if dataset is None:
        dataset = load_task(config.task, config.host, seed=settings.seed, difficulty=config.difficulty)
    host = build_host(
        config.host,
        dataset.input_shape,
        dataset.num_classes,
        vocab_size=dataset.vocab_size,
        width=settings.host_width,
    )
    params_initial = host.parameter_count()
    run_dir = RunDirectory(config.run_dir)
    catalogue = BlueprintCatalogue.open_default(config.catalogue_path)
    cleanup = CleanupStack(
        lambda name, exc: logging.getLogger("esper.tolaria").error("clean-up %r failed: %s", name, exc)
    )
    cleanup.push("close the blueprint catalogue", catalogue.close)
    with cleanup:
        # Commands come from this process's own controller: one issued before it started belongs to an
        # earlier life of the run and is refused, whatever the nonce ledger restored from a checkpoint holds.
        verifier = SignatureVerifier(
            secret,
            freshness_s=config.kasmina.command_freshness_s,
            future_skew_s=config.kasmina.clock_skew_s,
            not_before_ns=SYSTEM_CLOCK.wall_ns(),
        )
        manager = SeedManager(
            host.slots(),
            catalogue,
            verifier,
            config.kasmina,
            training_run_id=config.training_run_id,
            host=host,
        )
        trainer = Trainer(
            settings=settings,
            dataset=dataset,
            host=host,
            manager=manager,
            controller=controller,
            blueprint_ids=catalogue.ids_for(host.slot_kind),
            run_dir=run_dir,
            training_run_id=config.training_run_id,
            emergency=emergency,
        )
        if not resume:
            run_dir.write_json(run_dir.config_path, config.to_json())
        resumed_from = None
        if resume and trainer.resume():
            resumed_from = trainer.step
        outcome = _fit(trainer, console, progress, on_epoch)
    fossilized = manager.fossilized_count()  # stacked seeds included
    summary = {
        "run_id": config.training_run_id,
        "task": dataset.name,
        "host": config.host,
        "policy": config.policy,
        "epochs": settings.epochs,
        "steps": outcome.steps,
        "final_val_accuracy": outcome.evaluation.accuracy,
        "final_val_loss": outcome.evaluation.loss,
        "best_val_accuracy": trainer.best_val_accuracy,
        "params_initial": params_initial,
        "params_final": outcome.parameters,
        "max_params": settings.max_params or None,
        "seeds_fossilized": fossilized,
        "rollbacks": outcome.rollbacks,
        "decisions": trainer.decisions,
        "decision_deadline_misses": trainer.deadline_misses,
        "resumed_from_step": resumed_from,
        "wall_seconds": time.monotonic() - started,
        "status": "halted" if outcome.halt is not None else "completed",
        "halt": asdict(outcome.halt) if outcome.halt is not None else None,
        **lifecycle_counts(run_dir),
        # Accuracy and size before and after each growth (widen, deepen, seed), from the run's records.
        "growth_steps": growth_steps(run_dir.events.read(), run_dir.metrics.read()),
    }
    run_dir.write_json(run_dir.summary_path, summary)
    return summary


def lifecycle_counts(run_dir: RunDirectory) -> dict[str, Any]:
    """From events.jsonl: transitions per stage reached, seeds germinated and culled."""
    reached: Counter[str] = Counter()
    for event in run_dir.events.read():
        if event.get("kind") == "transition":
            reached[str(event["to_stage"])] += 1
    return {
        "transitions": dict(sorted(reached.items())),
        "seeds_germinated": reached.get("GERMINATED", 0),
        "seeds_culled": reached.get("CULLED", 0),
    }


def _fit(
    trainer: Trainer, console: Console | None, show: bool, observer: Callable[[EpochReport], None] | None
) -> Any:
    if not show:
        return trainer.fit(on_epoch=observer)
    progress = Progress(
        TextColumn("[bold]epoch"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        # Redrawn by the training thread after each epoch, never by a refresh thread: that thread holds
        # the GIL for ~0.4 ms ten times a second, and landing inside a decision it delays it as much.
        auto_refresh=False,
    )
    with progress:
        epochs = trainer.settings.epochs
        task = progress.add_task(
            "train",
            total=epochs,
            completed=trainer.step // trainer.steps_per_epoch,
            status="",
        )

        def on_epoch(report: EpochReport) -> None:
            progress.update(
                task,
                completed=report.epoch,
                status=f"acc {report.validation_accuracy:.3f}  params {report.parameters:,}  "
                f"active seeds {report.active_seeds}  fossilised {report.fossilized_seeds}",
                refresh=True,
            )
            if observer is not None:
                observer(report)

        return trainer.fit(on_epoch=on_epoch)


def summary_table(summary: dict[str, Any]) -> Table:
    """The summary as a rich table."""
    table = Table(title=f"run {summary['run_id']}", show_header=True)
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
        value = summary.get(key)
        if key == "max_params" and value is None:
            table.add_row(key, "unbounded")
            continue
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    transitions = summary.get("transitions", {})
    table.add_row("transitions", ", ".join(f"{k} {v}" for k, v in transitions.items()) or "none")
    return table


ControllerFactory = Callable[[], Controller]
