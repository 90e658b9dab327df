"""The training loop: steps, decisions, seed parameters in and out of the optimizer, checkpoints, rollback.

One step: forward, loss check (a NaN/inf or spiking loss rolls back to the last good checkpoint),
backward, `SeedManager.observe_backward`, optimizer step, `SeedManager.advance`, parameter changes.
Every `decision_interval` steps: evaluation with counterfactual contributions and the state packet, which
the controller starts deciding on while training goes on; `decision_lag_steps` later the trainer collects
the command (waiting at most for what is left of the controller's budget) and hands it to Kasmina. A
decision not back in time is a deadline miss: no command, a CRITICAL event, counted; only a long streak of
them (`max_consecutive_misses`) stops the run. A command that a change of its slot or of the host's
topology made stale before it could be applied is dropped with an event. No checkpoint is taken with a
decision in flight, and a HALT waits for the decision in flight.
Checkpoints (atomic, written beside training): at the start, after every structural change (a seed or
growth germinated, fossilised or culled, parameters added, merged or retired), every
`checkpoint_interval_s` seconds of training, and at the end; optionally
every `checkpoint_every_epochs` epochs. The first two kinds wait for the first step with no decision in
flight, so when they are taken never changes what the run does; the end (and an epoch's checkpoint)
collects the decision in flight first, at a step an uninterrupted run and a resumed one share.
Between steps, an optional emergency channel is polled: a HALT checkpoints, logs an event and ends `fit`
with a halted outcome (the run resumes from that checkpoint); a run that diverges broadcasts a HALT.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from esper.kasmina import EventKind, SeedManager, stage_name
from esper.leyline import SYSTEM_CLOCK, Clock, DecisionDeadlineMissed, EsperError, pb, value_label
from esper.tolaria.checkpoint import Checkpoint, CheckpointError, CheckpointStore
from esper.tolaria.controller import Controller
from esper.tolaria.data import Dataset
from esper.tolaria.device import module_device
from esper.tolaria.emergency import ChannelTrouble, EmergencyChannel, HaltRequest
from esper.tolaria.evaluation import Evaluation, Loss, evaluate
from esper.tolaria.growth_steps import GrowthLog
from esper.tolaria.hosts import Host
from esper.tolaria.optimizer import HOST_GROUP, GroupedAdam
from esper.tolaria.packet import build_packet, unmeasured_hardware
from esper.tolaria.records import RunDirectory
from esper.tolaria.settings import TolariaSettings

# What `restore` reads from a checkpoint's meta (`save_checkpoint` writes them all).
_META_FIELDS = frozenset(
    {
        "step",
        "loss_ema",
        "rollbacks",
        "decisions",
        "controller_failures",
        "best_val_accuracy",
        "interval_loss_sum",
        "interval_loss_count",
        "manager",
        "optimizer",
        "controller",
        "logs",
    }
)


# Transitions that change what the host computes with (with parameter changes: structural changes, each
# followed by a checkpoint).
_STRUCTURAL_STAGES = frozenset(
    stage_name(stage) for stage in (pb.SEED_STAGE_GERMINATED, pb.SEED_STAGE_FOSSILIZED, pb.SEED_STAGE_CULLED)
)


def check_checkpoint(directory: Path, checkpoint: Checkpoint) -> None:
    """Refuse (as damaged: `CheckpointError`) a checkpoint that lacks what `Trainer.restore` reads."""
    path = directory / f"ckpt-{checkpoint.step:09d}.json"
    missing = sorted(_META_FIELDS - checkpoint.meta.keys())
    if missing:
        raise CheckpointError(path, f"meta lacks {', '.join(missing)}")
    if not isinstance(checkpoint.meta["logs"], dict):
        raise CheckpointError(path, "meta's logs is not a mapping")
    if "rng.torch" not in checkpoint.tensors:
        raise CheckpointError(path, "tensors lack rng.torch")


class TrainingDiverged(EsperError):
    """The loss exploded more often than `max_rollbacks` allows."""

    def __init__(self, step: int, rollbacks: int, reason: str) -> None:
        self.step = step
        self.rollbacks = rollbacks
        self.reason = reason
        super().__init__(f"training diverged at step {step} after {rollbacks} rollback(s): {reason}")


class ControllerFailed(EsperError):
    """The controller failed `max_controller_failures` decisions in a row."""

    def __init__(self, step: int, failures: int, last_error: BaseException) -> None:
        self.step = step
        self.failures = failures
        self.last_error = last_error
        super().__init__(self._message())

    def _message(self) -> str:
        return f"controller failed {self.failures} decisions in a row (step {self.step}): {self.last_error}"


class DecisionsMissed(ControllerFailed):
    """The controller missed its deadline on `max_consecutive_misses` decisions in a row."""

    def _message(self) -> str:
        return (
            f"controller missed its deadline on {self.failures} decisions in a row (step {self.step}): "
            f"{self.last_error}"
        )


@dataclass
class _InFlight:
    """A decision submitted to the controller and not collected yet."""

    due: int  # the step at which its command is collected and applied
    record: dict[str, Any]  # its line of decisions.jsonl so far
    topology: bytes  # the host's topology it was decided on
    slots: dict[str, tuple[int, str]]  # stage and seed id of every slot it was decided on


@dataclass(frozen=True)
class EpochReport:
    """What the progress display shows at the end of an epoch."""

    epoch: int
    epochs: int
    step: int
    validation_accuracy: float
    validation_loss: float
    parameters: int
    active_seeds: int
    fossilized_seeds: int


@dataclass(frozen=True)
class TrainingOutcome:
    """The end of `fit`: final evaluation and parameter counts; `halt` is set when an emergency HALT
    stopped the run early (its checkpoint is the latest, so the run can be resumed)."""

    evaluation: Evaluation
    steps: int
    parameters: int
    rollbacks: int
    halt: HaltRequest | None = None

    @property
    def halted(self) -> bool:
        """True when the run stopped on an emergency HALT before its last step."""
        return self.halt is not None


class Trainer:
    """Trains a host with seeds under a controller, writing the run directory as it goes."""

    def __init__(
        self,
        *,
        settings: TolariaSettings,
        dataset: Dataset,
        host: Host,
        manager: SeedManager,
        controller: Controller,
        blueprint_ids: Sequence[str],
        run_dir: RunDirectory,
        training_run_id: str,
        clock: Clock = SYSTEM_CLOCK,
        emergency: EmergencyChannel | None = None,
        criterion: Loss | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.settings = settings
        # Where the run computes (the host's device when not given); every batch is moved there, a no-op
        # when the data lies there already.
        self.device = device if device is not None else module_device(host)
        self.criterion = criterion  # the training loss (cross-entropy when None)
        self.dataset = dataset
        self.host = host
        self.manager = manager
        self.controller = controller
        self.blueprint_ids = list(blueprint_ids)
        self.run_dir = run_dir
        self.training_run_id = training_run_id
        self.clock = clock
        self.emergency = emergency
        self._channel_trouble = False
        self.store = CheckpointStore(run_dir.checkpoint_dir, keep=settings.keep_checkpoints)
        self.steps_per_epoch = max(1, math.ceil(len(dataset.x_train) / settings.batch_size))
        self.total_steps = settings.epochs * self.steps_per_epoch
        self.optimizer = self._build_optimizer([HOST_GROUP], settings.lr)
        self.step = 0
        self.loss_ema: float | None = None
        self.grad_norm = 0.0  # of the last step before a decision
        self.rollbacks = 0
        self.controller_failures = 0
        self.deadline_misses = 0  # decisions not back within the controller's budget, in all
        self.consecutive_misses = 0
        self._in_flight: _InFlight | None = None
        self._deferred_halt: HaltRequest | None = None  # a HALT waiting for the decision in flight
        self._prepared_topology: bytes | None = None  # the topology the controller last warmed up on
        # The controller hears of a decision this many steps ahead (0: never).
        self._anticipation_steps = min(settings.anticipation_steps, settings.decision_interval - 1)
        self.decisions = 0
        # Lifecycle transitions by the stage reached, over the whole run (kept in checkpoints for resume).
        self.transitions: collections.Counter[str] = collections.Counter()
        # Each growth's accuracy and size before and after it (the summary's `growth_steps`), likewise.
        self.growth_log = GrowthLog()
        self.best_val_accuracy = 0.0
        self.interval_loss_sum = 0.0
        self.interval_loss_count = 0
        self.last_evaluation: Evaluation | None = None
        self._permutation_epoch = -1
        self._permutation = torch.empty(0, dtype=torch.long)
        # The host's topology and its deterministic bytes, kept until something could have changed the
        # host's structure: a command applied, a seed or growth event, parameters added, retired or
        # merged, a restore. Building it asks every layer for its growth sites.
        self._topology: tuple[pb.HostTopology, bytes] | None = None
        self._counts: tuple[int, int] | None = None  # parameters (all, the host's own), kept as long too
        # False until `host.train()` has run since the last command, parameter change or restore: new
        # modules and a restored host are put in training mode once, not on every step.
        self._host_in_training = False
        # A checkpoint is due after a structural change, or `checkpoint_interval_s` after the last one.
        self._structure_changed = False
        self._checkpointed_at = clock.monotonic()

    # -- the loop -------------------------------------------------------------------------------------------

    def fit(self, on_epoch: Callable[[EpochReport], None] | None = None) -> TrainingOutcome:
        """Train to `epochs` (from wherever a resume left off) and return the final outcome."""
        if not self.store.steps():
            self.save_checkpoint()
        while self.step < self.total_steps:
            halt = self._deferred_halt or self._poll_emergency()
            if halt is not None:
                if self._in_flight is None:
                    return self._halt(halt)
                # Obeyed once the decision in flight is applied (at most `decision_lag_steps` later), so
                # that the halt's checkpoint is one an uninterrupted run would pass through.
                self._deferred_halt = halt
            lead = self._anticipation_steps
            if lead and (self.step + lead) % self.settings.decision_interval == 0:
                self.controller.anticipate()  # a hint, so that the decision finds the controller warm
            self.train_step()
            if self._in_flight is not None and self.step >= self._in_flight.due:
                self.collect_decision()
            if self.step % self.settings.decision_interval == 0:
                self.decide()
            if self.step % self.steps_per_epoch == 0:
                epoch = self.step // self.steps_per_epoch
                every = self.settings.checkpoint_every_epochs
                if (every and epoch % every == 0) or self.step == self.total_steps:
                    self.collect_decision()  # never a checkpoint with a decision in flight
                    self.save_checkpoint()
                if on_epoch is not None:
                    on_epoch(self._epoch_report(epoch))
            if self._in_flight is None and self._checkpoint_due():
                self.save_checkpoint()
        return self.finish()

    def finish(self) -> TrainingOutcome:
        """End the run's lifecycles, evaluate the final model and wait for the last checkpoint."""
        self.collect_decision()
        self.manager.terminate(self.step)
        self._flush_events()
        self._apply_parameter_changes()
        final = self._evaluate()
        self.run_dir.metrics.append(self._metrics_record(final, final=True))
        # The last checkpoint, written meanwhile, is on disk before the run reports its end.
        self.store.flush()
        return TrainingOutcome(
            evaluation=final,
            steps=self.step,
            parameters=self.host.parameter_count(),
            rollbacks=self.rollbacks,
        )

    def train_step(self) -> None:
        """One optimisation step on the next batch (or a rollback when the loss explodes)."""
        settings = self.settings
        epoch, index = divmod(self.step, self.steps_per_epoch)
        batch = self._epoch_permutation(epoch)[
            index * settings.batch_size : (index + 1) * settings.batch_size
        ]
        xb = self.dataset.x_train[batch].to(self.device, non_blocking=True)
        yb = self.dataset.y_train[batch].to(self.device, non_blocking=True)
        if (self.step + 1) % settings.decision_interval == 0:
            self.manager.arm_gradient_probes()
        if not (self._host_in_training and self.host.training):
            self.host.train()
            self._host_in_training = True
        output = self.host(xb)
        loss = (
            nn.functional.cross_entropy(output, yb) if self.criterion is None else self.criterion(output, yb)
        )
        value = float(loss.detach())
        explosion = self._explosion(value)
        if explosion:
            self.rollback(explosion)
            return
        self.optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        if (self.step + 1) % settings.decision_interval == 0:
            self.grad_norm = self._gradient_norm()  # read by the decision that follows this step
        self.manager.observe_backward(self.step)
        self.optimizer.step()
        self._stepped(value)

    def external_step(self, loss: float) -> None:
        """Account for one optimisation step the caller's own loop took (forward, backward and optimizer
        step done, gradients not yet cleared), then decide at the run's cadence as `fit` does: seeds
        advance, parameter changes reach the optimizer, a decision is submitted, collected and applied,
        a checkpoint is written when one is due."""
        self.manager.observe_backward(self.step)
        self._stepped(loss)
        interval = self.settings.decision_interval
        if (self.step + 1) % interval == 0:
            self.manager.arm_gradient_probes()  # for the next step's backward
        if self._in_flight is not None and self.step >= self._in_flight.due:
            self.collect_decision()
        if self.step % interval == 0:
            self.decide()
        if self._in_flight is None and self._checkpoint_due():
            self.save_checkpoint()

    def _stepped(self, value: float) -> None:
        """After the optimizer step of training loss `value`: seeds advance, changes reach the optimizer."""
        settings = self.settings
        self.manager.advance(self.step)
        self._flush_events()
        self._apply_parameter_changes()
        decay = settings.loss_ema_decay
        self.loss_ema = value if self.loss_ema is None else decay * self.loss_ema + (1 - decay) * value
        self.interval_loss_sum += value
        self.interval_loss_count += 1
        self.step += 1

    def decide(self) -> None:
        """Evaluate, build the packet and submit it to the controller; its command is collected and handed
        to Kasmina `decision_lag_steps` later (at once with no lag)."""
        evaluation = self._evaluate()
        for slot_id, contribution in evaluation.contributions.items():
            self.manager.record_contribution(
                slot_id, accuracy=contribution.accuracy, loss=contribution.loss, step=self.step
            )
        self.best_val_accuracy = max(self.best_val_accuracy, evaluation.accuracy)
        training_loss = self.interval_loss_sum / max(1, self.interval_loss_count)
        self.interval_loss_sum, self.interval_loss_count = 0.0, 0
        device = f"{self.device.type}:{self.device.index or 0}"
        packet = build_packet(
            training_run_id=self.training_run_id,
            experiment_name=self.dataset.name,
            epoch=self.step // self.steps_per_epoch,
            global_step=self.step,
            validation_loss=evaluation.loss,
            validation_accuracy=evaluation.accuracy,
            training_loss=training_loss,
            timestamp_ns=self.clock.wall_ns(),
            topology=self._host_topology()[0],
            device=device,
            hardware=None if self.settings.hardware_context else unmeasured_hardware(device),
            seed_states=self.manager.seed_states(
                learning_rate=self.optimizer.lr, steps_per_epoch=self.steps_per_epoch
            ),
            blueprint_ids=self.blueprint_ids,
            training_metrics=self._training_metrics(training_loss),
            growth_states=self.manager.growth_states(
                learning_rate=self.optimizer.lr, steps_per_epoch=self.steps_per_epoch
            ),
            max_parameters=self.settings.max_params,
        )
        self.run_dir.metrics.append(
            self._metrics_record(evaluation, final=False, training_loss=training_loss)
        )
        self.decisions += 1
        record: dict[str, Any] = {
            "step": self.step,
            "epoch": packet.current_epoch,
            "packet_id": packet.packet_id,
            "validation_accuracy": evaluation.accuracy,
            "validation_loss": evaluation.loss,
        }
        self.collect_decision()  # a lag of `decision_interval` is due now; never two in flight
        topology = self._host_topology()[1]
        try:
            if topology != self._prepared_topology:
                self.controller.prepare(packet)
                self._prepared_topology = topology
            self.controller.submit(packet)
        except DecisionDeadlineMissed as exc:  # a controller that decides as it is submitted
            self._missed(record, exc)
            return
        except EsperError as exc:
            self._failed(record, exc)
            return
        slots = {state.slot_id: (state.stage, state.seed_id) for state in packet.seed_states}
        self._in_flight = _InFlight(self.step + self.settings.decision_lag_steps, record, topology, slots)
        if self.settings.decision_lag_steps == 0:
            self.collect_decision()

    def collect_decision(self, *, drop: str = "") -> None:
        """Collect the decision in flight, if any, and hand its command to Kasmina (or, with `drop`, say
        why it is dropped unapplied). Waits at most for what is left of the controller's budget."""
        flight = self._in_flight
        if flight is None:
            return
        self._in_flight = None
        record = flight.record
        record["applied_step"] = self.step
        try:
            command = self.controller.collect()
        except DecisionDeadlineMissed as exc:
            self._missed(record, exc)
            return
        except EsperError as exc:
            self._failed(record, exc)
            return
        self.controller_failures = 0
        self.consecutive_misses = 0
        record.update(_command_record(command))
        stale = drop or self._staleness(flight, command)
        if stale:
            record.update(accepted=False, dropped=stale)
            self.run_dir.decisions.append(record)
            self._log_trainer_event(
                "decision_dropped",
                reason=stale,
                detail={"command_id": command.command_id, "decided_at_step": record["step"]},
            )
            return
        result = self.manager.apply(command, step=self.step)
        if command.command_type not in (pb.COMMAND_WAIT, pb.COMMAND_OPTIMIZER):
            self._host_changed()  # a seed operation: what it changed shows in events and parameters too
        if result.accepted and command.command_type == pb.COMMAND_OPTIMIZER:
            self._adjust_lr(command.optimizer_adjustment.hyperparameters.get("lr_factor", 1.0))
        self._apply_parameter_changes()
        self._flush_events()
        record.update(
            accepted=result.accepted,
            rejection=result.reason.value if result.reason else "",
            detail=result.detail,
        )
        self.run_dir.decisions.append(record)

    def _staleness(self, flight: _InFlight, command: pb.AdaptationCommand) -> str:
        """Why `command` no longer fits the host ("" when it still does): the host's topology changed
        since its packet, or the slot it operates on changed stage or seed."""
        if self._host_topology()[1] != flight.topology:
            return "the host's topology changed while the decision was in flight"
        if command.HasField("seed_operation"):
            slot_id = command.seed_operation.slot_id
            decided = flight.slots.get(slot_id)
            if decided is not None and slot_id in self.manager.slot_ids:
                now = (self.manager.stage(slot_id), self.manager.seed_id(slot_id))
                if now != decided:
                    before = f"{stage_name(decided[0])} {decided[1] or '-'}"
                    after = f"{stage_name(now[0])} {now[1] or '-'}"
                    return f"slot {slot_id} changed while the decision was in flight ({before} -> {after})"
        return ""

    def _missed(self, record: dict[str, Any], exc: DecisionDeadlineMissed) -> None:
        """A decision not back within the controller's budget: no command, a CRITICAL event, counted; a
        streak of `max_consecutive_misses` stops the run."""
        self.deadline_misses += 1
        self.consecutive_misses += 1
        record.update(missed=True, error=f"{type(exc).__name__}: {exc}")
        self.run_dir.decisions.append(record)
        self._log_trainer_event(
            "decision_deadline_missed",
            reason=str(exc),
            detail={"decided_at_step": record["step"], "consecutive": self.consecutive_misses},
            level="CRITICAL",
        )
        if self.consecutive_misses >= self.settings.max_consecutive_misses:
            raise DecisionsMissed(self.step, self.consecutive_misses, exc) from exc

    def _failed(self, record: dict[str, Any], exc: EsperError) -> None:
        self.controller_failures += 1
        record.update(error=f"{type(exc).__name__}: {exc}")
        self.run_dir.decisions.append(record)
        self._log_trainer_event("controller_failed", reason=str(exc))
        if self.controller_failures >= self.settings.max_controller_failures:
            raise ControllerFailed(self.step, self.controller_failures, exc) from exc

    # -- emergencies ----------------------------------------------------------------------------------------

    def _poll_emergency(self) -> HaltRequest | None:
        if self.emergency is None:
            return None
        polled = self.emergency.poll_halt()
        if isinstance(polled, ChannelTrouble):
            # Degraded, not fatal: training goes on without halt signals, and the log says so once.
            if not self._channel_trouble:
                self._log_trainer_event("emergency_channel_unavailable", reason=polled.reason)
            self._channel_trouble = True
            return None
        if self._channel_trouble:
            self._log_trainer_event("emergency_channel_recovered", reason="emergency stream readable again")
            self._channel_trouble = False
        return polled

    def _halt(self, halt: HaltRequest) -> TrainingOutcome:
        """Obey a HALT: log it, checkpoint (the event included), and end with a halted outcome."""
        self._log_trainer_event(
            "emergency_halt",
            reason=halt.reason,
            detail={
                "origin": halt.origin,
                "signal_id": halt.signal_id,
                "training_run_id": halt.training_run_id,
            },
        )
        self.save_checkpoint()
        self.store.flush()
        return TrainingOutcome(
            evaluation=self._evaluate(),
            steps=self.step,
            parameters=self.host.parameter_count(),
            rollbacks=self.rollbacks,
            halt=halt,
        )

    def _diverged(self, reason: str) -> TrainingDiverged:
        """The error that ends a diverged run, after telling every process on the bus to halt."""
        error = TrainingDiverged(self.step, self.rollbacks, reason)
        if self.emergency is not None:
            signal_id = self.emergency.broadcast_halt(f"run {self.training_run_id}: {error}")
            self._log_trainer_event("emergency_broadcast", reason=str(error), detail={"signal_id": signal_id})
        return error

    # -- rollback and checkpoints ---------------------------------------------------------------------------

    def _explosion(self, loss: float) -> str:
        if not math.isfinite(loss):
            return f"loss is {loss}"
        ema = self.loss_ema
        settings = self.settings
        if (
            ema is not None
            and self.step >= settings.spike_warmup_steps
            and loss > settings.spike_factor * ema
            and loss > ema + settings.spike_min_delta
        ):
            return f"loss spiked to {loss:.4g} (running {ema:.4g})"
        return ""

    def rollback(self, reason: str) -> None:
        """Go back to the last good checkpoint, lower the learning rate, and report it."""
        if self.rollbacks >= self.settings.max_rollbacks:
            raise self._diverged(reason)
        failed_step = self.step
        # Decided on a state the rollback undoes: collected (so nothing of it runs on), never applied.
        self.collect_decision(drop="the run rolled back while the decision was in flight")
        damaged: list[CheckpointError] = []
        checkpoint = self.store.latest(on_damaged=damaged.append, check=self._check_checkpoint)
        if checkpoint is None:
            raise self._diverged(f"{reason}; no checkpoint to roll back to")
        rollbacks = self.rollbacks + 1
        self.restore(checkpoint)
        # What the controller recorded after that checkpoint belongs to the timeline the rollback undid.
        self.controller.rewound(self.training_run_id, self.step)
        for error in damaged:
            self._report_damaged(error)
        self.rollbacks = rollbacks
        self._adjust_lr(self.settings.rollback_lr_factor)
        self._log_trainer_event(
            "rollback",
            reason=reason,
            detail={"failed_step": failed_step, "restored_step": self.step, "lr": self.optimizer.lr},
        )

    def _checkpoint_due(self) -> bool:
        """A structural change since the last checkpoint, or `checkpoint_interval_s` of training."""
        return (
            self._structure_changed
            or self.clock.monotonic() - self._checkpointed_at >= self.settings.checkpoint_interval_s
        )

    def save_checkpoint(self) -> None:
        """Write an atomic checkpoint of everything needed to continue exactly from here."""
        self._structure_changed = False
        self._checkpointed_at = self.clock.monotonic()
        tensors: dict[str, Tensor] = {f"model.{k}": _portable(v) for k, v in self.host.state_dict().items()}
        optimizer_tensors, optimizer_meta = self.optimizer.export_state()
        tensors.update({name: value.to("cpu") for name, value in optimizer_tensors.items()})  # copies
        tensors["rng.torch"] = torch.get_rng_state()
        if self.device.type == "cuda":  # dropout and other draws on the device; restored on CUDA only
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        meta = {
            "training_run_id": self.training_run_id,
            "step": self.step,
            "loss_ema": self.loss_ema,
            "rollbacks": self.rollbacks,
            "decisions": self.decisions,
            "controller_failures": self.controller_failures,
            "deadline_misses": self.deadline_misses,
            "consecutive_misses": self.consecutive_misses,
            "best_val_accuracy": self.best_val_accuracy,
            "interval_loss_sum": self.interval_loss_sum,
            "interval_loss_count": self.interval_loss_count,
            "manager": self.manager.export_state(),
            "nonces": self.manager.export_nonces(),
            "optimizer": optimizer_meta,
            "controller": self.controller.export_state(),
            "logs": self.run_dir.log_sizes(),
            "transitions": dict(self.transitions),
            "growth_log": self.growth_log.state(),
        }
        self.store.save(
            self.step, tensors, meta, before_commit=self.run_dir.sync_logs, on_durable=self._durable_hook()
        )

    def _durable_hook(self) -> Callable[[], None]:
        """What the checkpoint writer runs once the checkpoint of this step is durable: the controller
        hears of it (so what it recorded up to here may leave the process)."""
        step, run = self.step, self.training_run_id
        return lambda: self.controller.checkpointed(run, step)

    def resume(self) -> bool:
        """Continue from the newest checkpoint (logs cut back to it); False when there is none."""
        damaged: list[CheckpointError] = []
        checkpoint = self.store.latest(on_damaged=damaged.append, check=self._check_checkpoint)
        if checkpoint is None:
            return False
        self.run_dir.truncate_logs(checkpoint.meta["logs"])
        self.restore(checkpoint)
        # Counted over the run's whole life: a rollback (a `restore`) keeps what the abandoned steps did.
        self.transitions = collections.Counter(checkpoint.meta.get("transitions", {}))
        self.growth_log = GrowthLog.restored(checkpoint.meta.get("growth_log"))
        for error in damaged:  # after the logs are cut back, so the events stay
            self._report_damaged(error)
        return True

    def _check_checkpoint(self, checkpoint: Checkpoint) -> None:
        check_checkpoint(self.store.directory, checkpoint)

    def _report_damaged(self, error: CheckpointError) -> None:
        self._log_trainer_event(
            "checkpoint_damaged",
            reason=f"skipped {error.path.name}: {error.reason}",
            detail={"path": str(error.path), "restored_step": self.step},
        )

    def restore(self, checkpoint: Checkpoint) -> None:
        """Put host, seeds, optimizer, controller, RNG and counters back as `checkpoint` has them."""
        meta = checkpoint.meta
        self.manager.restore_state(meta["manager"])
        self.manager.restore_nonces(meta.get("nonces", []))
        model_state = {
            k.removeprefix("model."): v for k, v in checkpoint.tensors.items() if k.startswith("model.")
        }
        self.host.load_state_dict(model_state, strict=True)
        groups = [str(group["name"]) for group in meta["optimizer"]["param_groups"]]
        self.optimizer = self._build_optimizer(groups, float(meta["optimizer"]["param_groups"][0]["lr"]))
        optimizer_tensors = {k: v for k, v in checkpoint.tensors.items() if k.startswith("optimizer.")}
        self.optimizer.restore_state(optimizer_tensors, meta["optimizer"])
        self.controller.restore_state(meta["controller"])
        torch.set_rng_state(checkpoint.tensors["rng.torch"])
        if self.device.type == "cuda" and "rng.cuda" in checkpoint.tensors:
            torch.cuda.set_rng_state(checkpoint.tensors["rng.cuda"], self.device)
        self.step = int(meta["step"])
        self.loss_ema = None if meta["loss_ema"] is None else float(meta["loss_ema"])
        self.rollbacks = int(meta["rollbacks"])
        self.decisions = int(meta["decisions"])
        self.controller_failures = int(meta["controller_failures"])
        # Absent from checkpoints written before decisions were pipelined.
        self.deadline_misses = int(meta.get("deadline_misses", 0))
        self.consecutive_misses = int(meta.get("consecutive_misses", 0))
        self.best_val_accuracy = float(meta["best_val_accuracy"])
        self.interval_loss_sum = float(meta["interval_loss_sum"])
        self.interval_loss_count = int(meta["interval_loss_count"])
        self.manager.drain_parameter_changes()
        self._structure_changed = False  # the checkpoint holds the structure as it is now
        self._host_changed()

    # -- helpers --------------------------------------------------------------------------------------------

    def _build_optimizer(self, group_order: Sequence[str], lr: float) -> GroupedAdam:
        seed_groups = dict(self.manager.seed_parameter_groups())
        seed_ids = {id(p) for params in seed_groups.values() for p in params}
        host_params = [p for p in self.host.parameters() if id(p) not in seed_ids]
        optimizer = GroupedAdam(host_params, lr=lr, weight_decay=self.settings.weight_decay)
        if group_order[0] != HOST_GROUP or set(group_order[1:]) != set(seed_groups):
            raise EsperError(
                f"optimizer groups {list(group_order)} do not match the host and seeds {list(seed_groups)}"
            )
        for name in group_order[1:]:
            optimizer.add_group(name, seed_groups[name])
        return optimizer

    def _host_topology(self) -> tuple[pb.HostTopology, bytes]:
        """The host's topology now, and its deterministic bytes (built again only after a change)."""
        if self._topology is None:
            topology = self.host.topology()
            self._topology = (topology, topology.SerializeToString(deterministic=True))
        return self._topology

    def _parameter_counts(self) -> tuple[int, int]:
        """Parameters of the model now (host and seeds) and of the host's own layers (counted again only
        after a change: counting walks every parameter)."""
        if self._counts is None:
            self._counts = (self.host.parameter_count(), self.host.host_parameter_count())
        return self._counts

    def _host_changed(self) -> None:
        """The host's structure or modules may have changed: topology, parameter counts and training mode
        are renewed."""
        self._topology = None
        self._counts = None
        self._host_in_training = False

    def _apply_parameter_changes(self) -> None:
        changes = self.manager.drain_parameter_changes()
        if not changes:
            return
        self._host_changed()
        self._structure_changed = True  # checkpointed at the first step with no decision in flight
        for merge in changes.merged:  # before `retired`: the new units' moments move into the host's
            self.optimizer.absorb(merge.old, merge.appended, merge.merged, dim=merge.dim)
        for seed_id, _ in changes.retired:
            if seed_id in self.optimizer.group_names:
                self.optimizer.retire_group(seed_id)
        for seed_id, params in changes.added:
            self.optimizer.add_group(seed_id, params)

    def _adjust_lr(self, factor: float) -> None:
        if not (math.isfinite(factor) and factor > 0):
            raise EsperError(f"lr factor must be finite and > 0, got {factor}")
        lr = min(self.settings.max_lr, max(self.settings.min_lr, self.optimizer.lr * factor))
        self.optimizer.set_lr(lr)

    def _epoch_permutation(self, epoch: int) -> Tensor:
        # Each epoch's order depends only on (seed, epoch): a resumed run draws the same batches.
        if epoch != self._permutation_epoch:
            generator = torch.Generator().manual_seed(self.settings.seed * 1_000_003 + epoch)
            # Drawn on the CPU (the same order on every device), kept where the data lies.
            order = torch.randperm(len(self.dataset.x_train), generator=generator)
            self._permutation = order.to(self.dataset.x_train.device)
            self._permutation_epoch = epoch
        return self._permutation

    def _evaluate(self) -> Evaluation:
        evaluation = evaluate(
            self.host,
            self.manager,
            self.dataset.x_val.to(self.device),
            self.dataset.y_val.to(self.device),
            batch_size=self.settings.eval_batch_size,
            criterion=self.criterion,
        )
        self.last_evaluation = evaluation
        return evaluation

    def _gradient_norm(self) -> float:
        """The global L2 norm of the host's and seeds' gradients after this step's backward pass."""
        norms = [
            torch.linalg.vector_norm(p.grad.detach())
            for group in self.optimizer.optimizer.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    def _training_metrics(self, training_loss: float) -> dict[str, float]:
        return {
            "lr": self.optimizer.lr,
            # The keys Tamiyo's graph reads (`GLOBAL_METRIC_KEYS`).
            "learning_rate": self.optimizer.lr,
            "grad_norm": self.grad_norm,
            "param_count": float(self._parameter_counts()[0]),
            "host_param_count": float(self._parameter_counts()[1]),
            "seed_param_count": float(self.manager.seed_parameter_count()),
            "train_loss": training_loss,
            "loss_ema": self.loss_ema if self.loss_ema is not None else training_loss,
            "best_val_accuracy": self.best_val_accuracy,
            "steps_per_epoch": float(self.steps_per_epoch),
            "decision_interval": float(self.settings.decision_interval),
            "total_epochs": float(self.settings.epochs),
            "progress": self.step / self.total_steps,
            "rollbacks": float(self.rollbacks),
        }

    def _metrics_record(
        self, evaluation: Evaluation, *, final: bool, training_loss: float | None = None
    ) -> dict[str, Any]:
        stages = {slot_id: stage_name(self.manager.stage(slot_id)) for slot_id in self.manager.slot_ids}
        self.growth_log.evaluation(
            self.step, final=final, accuracy=evaluation.accuracy, parameters=self._parameter_counts()[0]
        )
        return {
            "step": self.step,
            "epoch": self.step / self.steps_per_epoch,
            "final": final,
            "validation_accuracy": evaluation.accuracy,
            "validation_loss": evaluation.loss,
            "training_loss": training_loss,
            "lr": self.optimizer.lr,
            "parameters": self._parameter_counts()[0],
            "stages": stages,
            "alphas": {slot_id: self.manager.alpha(slot_id) for slot_id in self.manager.slot_ids},
            "contributions": {
                slot: {"accuracy": c.accuracy, "loss": c.loss} for slot, c in evaluation.contributions.items()
            },
        }

    def _epoch_report(self, epoch: int) -> EpochReport:
        evaluation = self.last_evaluation or self._evaluate()
        fossilized = self.manager.fossilized_count()  # stacked seeds included
        return EpochReport(
            epoch=epoch,
            epochs=self.settings.epochs,
            step=self.step,
            validation_accuracy=evaluation.accuracy,
            validation_loss=evaluation.loss,
            parameters=self._parameter_counts()[0],
            active_seeds=len(self.manager.live_seed_ids()),
            fossilized_seeds=fossilized,
        )

    def _flush_events(self) -> None:
        events = self.manager.drain_events()
        if not events:
            return
        self._host_changed()  # a seed or growth moved: it may have changed the host's structure
        epoch = self.step / self.steps_per_epoch
        for event in events:
            if event.kind == EventKind.TRANSITION and event.to_stage in _STRUCTURAL_STAGES:
                self._structure_changed = True
            record = {**event.to_json(), "epoch": epoch}
            if record.get("kind") == "transition":
                self.transitions[str(record["to_stage"])] += 1
                self.growth_log.transition(record)
            self.run_dir.events.append(record)

    def _log_trainer_event(
        self, kind: str, *, reason: str, detail: dict[str, Any] | None = None, level: str = ""
    ) -> None:
        event: dict[str, Any] = {
            "kind": kind,
            "step": self.step,
            "epoch": self.step / self.steps_per_epoch,
            "reason": reason,
            "detail": detail or {},
        }
        if level:
            event["level"] = level
        self.run_dir.events.append(event)


def _portable(tensor: Tensor) -> Tensor:
    """A checkpoint's copy of `tensor`: detached, contiguous and on the CPU, whatever device the run is
    on, so that a checkpoint resumes on any device (loading puts each tensor where its parameter is)."""
    return tensor.detach().to("cpu", copy=True).contiguous()


def _command_record(command: pb.AdaptationCommand) -> dict[str, Any]:
    record: dict[str, Any] = {
        "command_id": command.command_id,
        "command_type": value_label(pb.CommandType, command.command_type),
        "issued_by": command.issued_by,
        "target_seed_id": command.target_seed_id,
        "annotations": dict(command.annotations),
    }
    if command.HasField("seed_operation"):
        operation = command.seed_operation
        record.update(
            operation=value_label(pb.SeedOperation, operation.operation),
            slot_id=operation.slot_id,
            blueprint_id=operation.blueprint_id,
            blend_mode=value_label(pb.BlendMode, operation.blend_mode),
            alpha_ramp_steps=operation.alpha_ramp_steps,
        )
    return record
