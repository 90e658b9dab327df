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

This module holds the loop (steps, epochs, emergencies). The constructor, the run's state and the shared
helpers are in trainer_core.py; the decision pipeline in trainer_decisions.py; checkpoints, resume and
rollback in trainer_checkpoints.py. Each part subclasses the one before it, `Trainer` the last.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from esper.tolaria.emergency import ChannelTrouble, HaltRequest
from esper.tolaria.evaluation import Evaluation
from esper.tolaria.trainer_checkpoints import TrainingDiverged, _Checkpointing, check_checkpoint
from esper.tolaria.trainer_decisions import ControllerFailed, DecisionsMissed

__all__ = [
    "ControllerFailed",
    "DecisionsMissed",
    "EpochReport",
    "Trainer",
    "TrainingDiverged",
    "TrainingOutcome",
    "check_checkpoint",
]


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


class Trainer(_Checkpointing):
    """Trains a host with seeds under a controller, writing the run directory as it goes."""

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
        if (self.step + 1) % self.settings.decision_interval == 0:
            self.grad_norm = self._gradient_norm()  # the gradients are still there
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

    # -- helpers --------------------------------------------------------------------------------------------

    def _epoch_permutation(self, epoch: int) -> Tensor:
        # Each epoch's order depends only on (seed, epoch): a resumed run draws the same batches.
        if epoch != self._permutation_epoch:
            generator = torch.Generator().manual_seed(self.settings.seed * 1_000_003 + epoch)
            # Drawn on the CPU (the same order on every device), kept where the data lies.
            order = torch.randperm(len(self.dataset.x_train), generator=generator)
            self._permutation = order.to(self.dataset.x_train.device)
            self._permutation_epoch = epoch
        return self._permutation

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
