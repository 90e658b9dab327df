"""Checkpoints, resume and rollback for `Trainer`: what is saved, how it is checked and put back."""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from esper.leyline import EsperError
from esper.tolaria.checkpoint import Checkpoint, CheckpointError
from esper.tolaria.growth_steps import GrowthLog
from esper.tolaria.trainer_decisions import _DecisionPipeline

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


class _Checkpointing(_DecisionPipeline):
    """Saves and restores the run; rolls back to the last good checkpoint when the loss explodes."""

    def _diverged(self, reason: str) -> TrainingDiverged:
        """The error that ends a diverged run, after telling every process on the bus to halt (unless
        `halt_on_divergence` is off)."""
        error = TrainingDiverged(self.step, self.rollbacks, reason)
        if self.emergency is not None and self.settings.halt_on_divergence:
            signal_id = self.emergency.broadcast_halt(f"run {self.training_run_id}: {error}")
            self._log_trainer_event("emergency_broadcast", reason=str(error), detail={"signal_id": signal_id})
        return error

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


def _portable(tensor: Tensor) -> Tensor:
    """A checkpoint's copy of `tensor`: detached, contiguous and on the CPU, whatever device the run is
    on, so that a checkpoint resumes on any device (loading puts each tensor where its parameter is)."""
    return tensor.detach().to("cpu", copy=True).contiguous()
