# Over 500 lines: the one run recipe; every part it opens is closed by the same exit stack.
"""`RunAssembly`: the one recipe that builds a run from resolved settings, trains it and closes it.

It owns, in one clean-up stack, everything a run opens: one bus connection, the catalogue (opened once),
Tamiyo's store, the blueprint metadata cache, the controller, the emergency channel and the metrics. The
host, the data and the loss are inputs: the CLI resolves them from task names, a Python caller passes
its own. Closing happens in one place, newest first, and a failing close is reported beside the error
that ended the run, never instead of it.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import torch
from prometheus_client import CollectorRegistry
from torch import nn

from esper.assembly.progress import fit
from esper.assembly.settings import RunSettings
from esper.assembly.start import FreshStart
from esper.assembly.summary import RunSummary
from esper.assembly.tamiyo import (
    TamiyoParts,
    Warn,
    build_tamiyo,
    load_policy,
    metadata_cache,
    open_catalogue,
)
from esper.kasmina import SeedManager
from esper.leyline import (
    SYSTEM_CLOCK,
    CleanupStack,
    SignatureVerifier,
    resolve_signing_secret,
)
from esper.leyline.cleanup import CleanupReporter
from esper.nissa import MetricsServer, RunMetrics, write_snapshot
from esper.nissa.layout import RunLayout
from esper.nissa.log import EventLog, JsonlLog, write_json
from esper.nissa.status import RunStatus
from esper.oona import Bus, EmergencyBroadcaster, EmergencyListener, emergency_verifier, open_bus
from esper.tolaria import run as tolaria_run
from esper.tolaria.controller import Controller
from esper.tolaria.data import Dataset
from esper.tolaria.device import DeviceUnavailable, module_device, resolve_device
from esper.tolaria.emergency import BusEmergencyChannel
from esper.tolaria.evaluation import Loss
from esper.tolaria.hosts import Host
from esper.tolaria.records import RunDirectory
from esper.tolaria.run import RunConfig, config_host, load_task
from esper.tolaria.trainer import EpochReport, Trainer, TrainingOutcome
from esper.urza import BlueprintCatalogue

if TYPE_CHECKING:
    from rich.console import Console

    from esper.tamiyo import BlueprintMetadataCache, Policy, TamiyoStore

logger = logging.getLogger("esper.assembly")


@dataclass(frozen=True)
class RunInputs:
    """What is trained: the data, the host model and the loss.

    `host` None: the config's host kind built for the data; `loss` None: cross-entropy."""

    dataset: Dataset
    host: Host | None = None
    loss: Loss | None = None


class RunAssembly:
    """One run, built from `settings` and `config`: open it (`with`), `train()`, and it closes itself.

    `controller`: a ready controller (tests, scripted runs); else Tamiyo is built with `policy` (a policy
    object) or the config's policy by name. `catalogue`: an open catalogue the caller keeps (several runs
    in one process); else the config's is opened, once, for this run. `deployment`: the run joins the
    deployment's bus (Tamiyo's outbox and policy updates, catalogue notifications, emergency HALTs) and
    keeps Tamiyo's durable store in the run directory; without it the run is isolated (benchmarks).
    `run_log` installs the run's log file once the directory exists and returns its undo; `warn` tells
    the operator what they act on.
    """

    def __init__(
        self,
        settings: RunSettings,
        config: RunConfig,
        *,
        secret: bytes,
        inputs: RunInputs | None = None,
        controller: Controller | None = None,
        policy: Policy | None = None,
        catalogue: BlueprintCatalogue | None = None,
        resume: bool = False,
        deployment: bool = True,
        command: str | None = None,
        run_log: Callable[[Path], Callable[[], None]] | None = None,
        warn: Warn | None = None,
        on_cleanup_failure: CleanupReporter | None = None,
    ) -> None:
        self.settings = settings
        self.config = config
        self.layout = RunLayout(config.run_dir)
        self.resume = resume
        self.deployment = deployment
        self.command = command if command is not None else shlex.join(sys.argv)
        self._secret = secret
        self._inputs = inputs
        self._given_controller = controller
        self._policy = policy
        self._given_catalogue = catalogue
        self._run_log = run_log
        self._warn = warn
        self._on_cleanup_failure = on_cleanup_failure
        self._cleanup = CleanupStack(self._report_cleanup_failure)
        self._ended_status: str | None = None
        self.registry = CollectorRegistry()  # this run's metrics only, never the process-global registry
        self.metrics = RunMetrics(self.registry, config.training_run_id)
        self.bus: Bus | None = None
        self.catalogue: BlueprintCatalogue | None = None
        self.metadata: BlueprintMetadataCache | None = None
        self.store: TamiyoStore | None = None
        self.tamiyo: TamiyoParts | None = None
        self.emergency: BusEmergencyChannel | None = None
        self.metrics_server: MetricsServer | None = None
        self.trainer: Trainer | None = None
        self.device: torch.device | None = None  # where the run computes, once `prepare` has resolved it
        self._params_initial = 0
        self._events: EventLog | None = None
        self._run_directory: RunDirectory | None = None

    # -- opening and closing ------------------------------------------------------------------------------

    def defer(self, name: str, step: Callable[[], object]) -> None:
        """Run `step` when the run closes, before everything opened so far (one stack for the whole run)."""
        self._cleanup.push(name, step)

    def __enter__(self) -> RunAssembly:
        try:
            self._open()
        except BaseException as exc:
            self._cleanup.close(exc)
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._cleanup.__exit__(exc_type, exc, tb)

    def _open(self) -> None:
        settings, config, cleanup = self.settings, self.config, self._cleanup
        root = config.run_dir
        if not self.resume:  # a start that fails before training removes what it created, and only that
            cleanup.push("remove what the failed start created", FreshStart(root, self.layout.config).undo)
        root.mkdir(parents=True, exist_ok=True)
        if self._run_log is not None:
            cleanup.push("close the run's log", self._run_log(self.layout.log))
        # Opened once for the whole run and closed after everything that may write an event.
        self._events = EventLog(self.layout.events)
        self._run_directory = run_directory(self.layout, events=self._events)
        cleanup.push("close the run's logs", self._run_directory.close)
        if settings.nissa.metrics_port is not None:
            server = MetricsServer(self.registry, settings.nissa.metrics_port, settings.nissa.metrics_address)
            self.metrics_server = server
            cleanup.push("stop the metrics server", server.close)
        # The final figures (outbox counters included), also when the run failed; a start that failed
        # before training has none.
        cleanup.push("write metrics.prom", self._write_metrics_snapshot)
        if self.deployment:
            bus = open_bus(settings.esper, settings.oona)
            self.bus = bus
            cleanup.push("close the bus", bus.close)
        catalogue = self._given_catalogue or open_catalogue(config.catalogue_path, self.bus, cleanup)
        self.catalogue = catalogue
        if self._given_controller is None:
            self._open_tamiyo(catalogue)
        if self.bus is not None:
            self.emergency = self._emergency_channel(self.bus)
            cleanup.push("close the emergency channel", self.emergency.close)

    def _open_tamiyo(self, catalogue: BlueprintCatalogue) -> None:
        settings, cleanup = self.settings, self._cleanup
        self.metadata = metadata_cache(catalogue, settings.tamiyo, self.bus, cleanup)
        if self.bus is not None:
            from esper.tamiyo import TamiyoStore

            store = TamiyoStore(self.layout.tamiyo_store)
            self.store = store
            cleanup.push("close Tamiyo's store", store.close)
            if self.resume:
                self._abandon_past_checkpoint(store)
        policy = self._policy or load_policy(self.config.policy, settings.tamiyo, self.metadata, self.store)
        self.tamiyo = build_tamiyo(
            policy,
            settings.tamiyo,
            self._secret,
            cleanup,
            metadata=self.metadata,
            # Windows are aborted when the run ended; one that stopped early (failure, halt, interrupt)
            # leaves them open for a resume.
            run_ended=lambda: self._ended_status == "completed",
            bus=self.bus,
            store=self.store,
            policies=self.layout.policies,
            feed_group=f"tamiyo-{self.config.run_dir.name}",
            registry=self.registry,
            warn=self._warn,
        )

    def _emergency_channel(self, bus: Bus) -> BusEmergencyChannel:
        """HALTs for this run (or for everyone) on the run's bus connection, and the broadcaster of one."""
        esper, oona = self.settings.esper, self.settings.oona
        listener = EmergencyListener(bus, oona, verifier=emergency_verifier(esper), owns_bus=False)
        run_id = self.config.training_run_id
        broadcaster = EmergencyBroadcaster(bus, f"tolaria {run_id}", secret=resolve_signing_secret(esper))
        return BusEmergencyChannel(
            listener, broadcaster, training_run_id=run_id, poll_interval_s=oona.emergency_poll_ms / 1000
        )

    def _abandon_past_checkpoint(self, store: TamiyoStore) -> None:
        """Before Tamiyo starts (and its outbox publishes anything), cut the store's timeline back to the
        checkpoint the run resumes from: decisions taken after it are re-decided by the resumed run, so
        theirs are abandoned (never published from now on, never learned from). Without a checkpoint the
        run starts over, and its whole earlier timeline is abandoned."""
        step = tolaria_run.resume_step(self.layout.checkpoints)
        cut = store.abandon_after(self.config.training_run_id, -1 if step is None else step)
        if (cut.decisions or cut.field_reports or cut.already_published) and self._warn is not None:
            self._warn(
                f"resume from step {step or 0}: abandoned {cut.decisions} decision(s) and "
                f"{cut.field_reports} pending field report(s) written after it"
                + (
                    f"; {cut.already_published} of them were published before the crash"
                    if cut.already_published
                    else ""
                )
            )

    def _write_metrics_snapshot(self) -> None:
        if self.layout.config.exists():
            write_snapshot(self.registry, self.layout.metrics_snapshot)

    def _report_cleanup_failure(self, name: str, exc: Exception) -> None:
        """A failed clean-up step: logged, told to the caller, and recorded as an event of the run."""
        logger.error("clean-up step %r failed: %s: %s", name, type(exc).__name__, exc)
        if self._on_cleanup_failure is not None:
            self._on_cleanup_failure(name, exc)
        if self._events is None:  # the run never started: there is no event log to add to
            return
        try:
            self._events("cleanup_failed", f"{type(exc).__name__}: {exc}", cleanup=name)
        except (OSError, ValueError) as write_error:  # a full disk, or the log closed already
            logger.error("cannot record the clean-up failure: %s", write_error)

    # -- the run ------------------------------------------------------------------------------------------

    @property
    def controller(self) -> Controller:
        """The controller the run trains under (Tamiyo bound for Tolaria, or the one given)."""
        if self._given_controller is not None:
            return self._given_controller
        if self.tamiyo is None:
            raise RuntimeError("the run is not open: use `with RunAssembly(...) as run`")
        return self.tamiyo.controller

    def prepare(self) -> Trainer:
        """Build the trainer (data, host, seeds, controller) and begin the run (config.json); `train`
        calls it. Everything is built before config.json is written: a run directory holds a run only
        once training can begin."""
        if self.trainer is not None:
            return self.trainer
        if self.catalogue is None:
            raise RuntimeError("the run is not open: use `with RunAssembly(...) as run`")
        config, settings = self.config, self.config.tolaria
        torch.set_num_threads(settings.threads)
        torch.manual_seed(settings.seed)
        inputs = self._inputs or RunInputs(
            load_task(config.task, config.host, seed=settings.seed, difficulty=config.difficulty)
        )
        if inputs.host is not None:
            # The user's model stays where it is and the run computes there; their data is not moved
            # either (each batch goes to the model's device as it is drawn).
            host = inputs.host
            device = run_device(settings.device, host)
            dataset = inputs.dataset
        else:
            device = resolve_device(settings.device)
            dataset = inputs.dataset.to(device)  # a bundled task: held on the device for the whole run
            host = config_host(config, dataset).to(device)
        self.device = device
        self._params_initial = host.parameter_count()
        # Commands come from this process's own controller: one issued before it started belongs to an
        # earlier life of the run and is refused, whatever the nonce ledger restored from a checkpoint holds.
        verifier = SignatureVerifier(
            self._secret,
            freshness_s=config.kasmina.command_freshness_s,
            future_skew_s=config.kasmina.clock_skew_s,
            not_before_ns=SYSTEM_CLOCK.wall_ns(),
        )
        manager = SeedManager(
            host.slots(),
            self.catalogue,
            verifier,
            config.kasmina,
            training_run_id=config.training_run_id,
            host=host,
            device=device,
        )
        run_dir = self._run_directory
        if run_dir is None:
            raise RuntimeError("the run is not open: use `with RunAssembly(...) as run`")
        trainer = Trainer(
            settings=settings,
            dataset=dataset,
            host=host,
            manager=manager,
            controller=self.controller,
            blueprint_ids=offered_blueprints(self.catalogue, host),
            run_dir=run_dir,
            training_run_id=config.training_run_id,
            emergency=self.emergency,
            criterion=inputs.loss,
            device=device,
        )
        self.trainer = trainer
        if not self.resume:  # the run begins: a failure from here on leaves a run to resume
            write_json(self.layout.config, config.to_json())
        return trainer

    def train(
        self,
        *,
        on_epoch: Callable[[EpochReport], None] | None = None,
        progress: bool = False,
        console: Console | None = None,
    ) -> RunSummary:
        """Train as the config says; returns (and writes) the summary, and keeps status.json current.

        `on_epoch` sees every epoch's figures. With a bus the run obeys emergency HALTs: it checkpoints
        and stops early, and the summary says "halted" (resume it with `resume=True`). A failure marks
        the run failed with its reason, Ctrl-C marks it halted, and the exception goes on."""
        with self.driven() as drive:
            trainer = drive.trainer
            resumed_from = trainer.step if self.resume and trainer.resume() else None
            outcome = fit(trainer, console, progress, self._observer(on_epoch))
            return drive.conclude(outcome, resumed_from=resumed_from)

    @contextlib.contextmanager
    def driven(self) -> Iterator[Drive]:
        """The run trained by a loop outside the assembly (`train`'s own, or a user's loop through
        `esper.GrowthSession`): status.json says running until the block ends, and then how it ended;
        `Drive.conclude` writes the summary. A failure marks the run failed with its reason, Ctrl-C
        marks it halted, and the exception goes on."""
        started = time.monotonic()
        trainer = self.prepare()
        status = RunStatus.running(self.command)
        status.write(self.layout.status)
        drive = Drive(self, trainer, started)
        try:
            yield drive
        except KeyboardInterrupt:
            self._end(status, "halted", "interrupted (Ctrl-C)")
            raise
        except BaseException as exc:  # a summary that cannot be written fails the run as well
            self._end(status, "failed", f"{type(exc).__name__}: {exc}")
            raise
        summary = drive.summary
        if summary is None:
            self._end(status, "failed", "the run ended without a summary")
            return
        halt = summary.halt
        self._end(status, summary.status, None if halt is None else f"{halt.origin}: {halt.reason}")

    def _conclude(
        self, trainer: Trainer, outcome: TrainingOutcome, resumed_from: int | None, started: float
    ) -> RunSummary:
        summary = self._summary(
            trainer, outcome, self._params_initial, resumed_from, time.monotonic() - started
        )
        self.metrics.finish(
            step=summary.steps,
            validation_accuracy=summary.final_val_accuracy,
            validation_loss=summary.final_val_loss,
            parameters=summary.params_final,
            fossilized_seeds=summary.seeds_fossilized,
        )
        write_json(self.layout.summary, summary.to_json())
        return summary

    def _end(self, status: RunStatus, ended: str, reason: str | None) -> None:
        self._ended_status = ended
        status.ended(ended, reason).write(self.layout.status)  # type: ignore[arg-type]

    def _observer(self, on_epoch: Callable[[EpochReport], None] | None) -> Callable[[EpochReport], None]:
        def observe(report: EpochReport) -> None:
            self.metrics.observe(
                epoch=report.epoch,
                step=report.step,
                validation_accuracy=report.validation_accuracy,
                validation_loss=report.validation_loss,
                parameters=report.parameters,
                active_seeds=report.active_seeds,
                fossilized_seeds=report.fossilized_seeds,
            )
            if on_epoch is not None:
                on_epoch(report)

        return observe

    def _summary(
        self,
        trainer: Trainer,
        outcome: TrainingOutcome,
        params_initial: int,
        resumed_from: int | None,
        wall_seconds: float,
    ) -> RunSummary:
        config = self.config
        # Every seed and growth (widen, deepen) that became part of the host, as `seeds_germinated` and
        # `seeds_culled` count them: one lifecycle, one count (stacked seeds included).
        fossilized = trainer.transitions.get("FOSSILIZED", 0)
        return RunSummary(
            run_id=config.training_run_id,
            task=trainer.dataset.name,
            host=config.host,
            policy=config.policy,
            epochs=config.tolaria.epochs,
            steps=outcome.steps,
            final_val_accuracy=outcome.evaluation.accuracy,
            final_val_loss=outcome.evaluation.loss,
            best_val_accuracy=trainer.best_val_accuracy,
            params_initial=params_initial,
            params_final=outcome.parameters,
            max_params=config.tolaria.max_params or None,
            seeds_fossilized=fossilized,
            rollbacks=outcome.rollbacks,
            decisions=trainer.decisions,
            decision_deadline_misses=trainer.deadline_misses,
            resumed_from_step=resumed_from,
            wall_seconds=wall_seconds,
            status="halted" if outcome.halt is not None else "completed",
            halt=outcome.halt,
            transitions=dict(sorted(trainer.transitions.items())),
            growth_steps=trainer.growth_log.steps(),
        )


def run_device(spec: str, host: nn.Module) -> torch.device:
    """The device of a run given its own model: that model's. `spec` (TOLARIA_DEVICE) other than `auto`
    must name the same device: the run never moves a model its owner placed."""
    device = module_device(host)
    if spec != "auto":
        asked = resolve_device(spec)
        if asked != device and not (asked.type == device.type == "cuda" and device.index is None):
            raise DeviceUnavailable(
                spec, f"the model given to the run lies on {device}; move it there, or leave the device auto"
            )
    return device


class Drive:
    """A run being trained inside `RunAssembly.driven`: its trainer, and `conclude` once it ended."""

    def __init__(self, run: RunAssembly, trainer: Trainer, started: float) -> None:
        self.trainer = trainer
        self.summary: RunSummary | None = None
        self._run = run
        self._started = started

    def conclude(self, outcome: TrainingOutcome, *, resumed_from: int | None = None) -> RunSummary:
        """The run's summary from the trainer's final `outcome`, written to summary.json."""
        self.summary = self._run._conclude(self.trainer, outcome, resumed_from, self._started)
        return self.summary


def offered_blueprints(catalogue: BlueprintCatalogue, host: Host) -> list[str]:
    """The blueprints offered to the controller: those of the host's slot kind, then those of any other
    kind its slots have (a user's CNN with a Linear head has conv and MLP slots), each once."""
    kinds = [host.slot_kind, *(slot.kind for slot in host.slots())]
    return list(dict.fromkeys(b for kind in dict.fromkeys(kinds) for b in catalogue.ids_for(kind)))


def run_directory(layout: RunLayout, *, events: EventLog | None = None) -> RunDirectory:
    """The trainer's view of the run directory at `layout`: Nissa's logs, opened now (the event log
    `events` when it is open already), and the checkpoint directory. Closing it closes the logs."""
    layout.root.mkdir(parents=True, exist_ok=True)
    return RunDirectory(
        metrics=JsonlLog(layout.metrics),
        decisions=JsonlLog(layout.decisions),
        events=events or EventLog(layout.events),
        checkpoint_dir=layout.checkpoints,
    )


def resolve_config(config: RunConfig, *, resume: bool) -> RunConfig:
    """The config to run: `config` for a fresh run, the run directory's own config.json on resume."""
    return tolaria_run.resolve_config(config, resume=resume, path=RunLayout(config.run_dir).config)
