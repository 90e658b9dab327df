"""The state a `Trainer` keeps and the helpers its parts share: optimizer, topology, metrics, events.

`Trainer` (trainer.py) builds on this core in a chain: the decision pipeline (trainer_decisions.py), then
checkpoints, resume and rollback (trainer_checkpoints.py, which drop a decision in flight), then the loop.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from esper.kasmina import EventKind, SeedManager, stage_name
from esper.leyline import SYSTEM_CLOCK, Clock, EsperError, pb
from esper.tolaria.checkpoint import CheckpointStore
from esper.tolaria.controller import Controller
from esper.tolaria.data import Dataset
from esper.tolaria.device import module_device
from esper.tolaria.emergency import EmergencyChannel, HaltRequest
from esper.tolaria.evaluation import Evaluation, Loss, evaluate
from esper.tolaria.growth_steps import GrowthLog
from esper.tolaria.hosts import Host
from esper.tolaria.optimizer import HOST_GROUP, GroupedAdam
from esper.tolaria.records import RunDirectory
from esper.tolaria.settings import TolariaSettings

# Transitions that change what the host computes with (with parameter changes: structural changes, each
# followed by a checkpoint).
_STRUCTURAL_STAGES = frozenset(
    stage_name(stage) for stage in (pb.SEED_STAGE_GERMINATED, pb.SEED_STAGE_FOSSILIZED, pb.SEED_STAGE_CULLED)
)


@dataclass
class _InFlight:
    """A decision submitted to the controller and not collected yet."""

    due: int  # the step at which its command is collected and applied
    record: dict[str, Any]  # its line of decisions.jsonl so far
    topology: bytes  # the host's topology it was decided on
    slots: dict[str, tuple[int, str]]  # stage and seed id of every slot it was decided on


class _TrainerCore:
    """The run's state (step, counters, optimizer, caches) and the helpers every part of the loop uses."""

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
