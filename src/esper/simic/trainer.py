"""Simic's training rounds: transitions in, a validated and signed policy update out (or a logged refusal).

One round, as a recipe:

1. Graphs: rebuild every decision's graph with the policy's own builder; resolve the recorded choices.
2. Mode: PPO when there are enough decisions sampled by the GNN itself (on-policy material); otherwise the
   imitation bootstrap when there are enough heuristic decisions; otherwise the round is skipped.
   `distil` (asked for, never chosen by `auto`) clones every decision given, whichever policy made it:
   self-imitation, when the caller has kept only the runs that scored best (expert iteration). Its
   held-out agreement is recorded, not compared with the parent's (the parent was trained on most of the
   same runs): the caller judges a distil round by the outcome of its policy's runs.
3. Split: a held-out share of the decisions is kept away from training, for validation.
4. Train a *candidate* (a copy of the current policy): `ppo.ppo_update` or `imitation.imitate`.
5. Validate the candidate against its parent (`validation.validate_candidate`).
6. Publish: a passing candidate becomes the next version of the lineage (sequence + 1), is signed and
   published, saved in the state directory, and is the parent of the next round. A failing one is not
   published; the round's record says why.

Every round appends one JSON line to `lineage.jsonl` in the state directory: mode, versions, sequence,
counts, training and validation figures, and the reasons a candidate was refused.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Literal

import torch

from esper.leyline import SYSTEM_CLOCK, Clock, pb
from esper.oona import Bus, Streams, envelope_for
from esper.simic.imitation import imitate
from esper.simic.ppo import make_rollout, ppo_update, refit_critic
from esper.simic.records import RecordStore
from esper.simic.settings import SimicSettings
from esper.simic.state import RoundResult, SimicState
from esper.simic.transitions import (
    RecordCollector,
    Sample,
    TransitionSet,
    build_samples,
    drain_bus,
    reclaim_pending,
)
from esper.simic.updates import build_policy_update
from esper.simic.validation import validate_candidate
from esper.tamiyo.model.builder import GraphBuilder
from esper.tamiyo.model.policy import GNNPolicy
from esper.tamiyo.model.schema import BlueprintLookup
from esper.tamiyo.settings import TamiyoSettings

_log = logging.getLogger("esper.simic")

Mode = Literal["auto", "ppo", "imitation", "distil"]
Publisher = Callable[[pb.PolicyUpdate], None]


class SimicTrainer:
    """Trains Tamiyo's policy in rounds and publishes the candidates that pass validation."""

    def __init__(
        self,
        settings: SimicSettings,
        tamiyo_settings: TamiyoSettings,
        policy: GNNPolicy,
        secret: bytes,
        *,
        sequence: int = 0,
        publish: Publisher | None = None,
        state: SimicState | None = None,
        training_run_id: str = "",
        clock: Clock = SYSTEM_CLOCK,
        blueprint_metadata: BlueprintLookup | None = None,
    ) -> None:
        self.settings = settings
        # The catalogue lookup Tamiyo's builder had, so rebuilt graphs see the same blueprint features.
        self._blueprint_metadata = blueprint_metadata
        self._tamiyo_settings = tamiyo_settings
        self.policy = policy
        self.sequence = sequence
        self._secret = secret
        self._publish = publish
        self._state = state
        self._training_run_id = training_run_id
        self._clock = clock
        self._generator = torch.Generator().manual_seed(settings.seed)
        self.last_update: pb.PolicyUpdate | None = None
        self._imitation: list[Sample] = []

    def keep_imitation(self, transitions: TransitionSet) -> int:
        """Keep the heuristic decisions of `transitions` for behaviour cloning during PPO (`bc_coef`);
        returns how many samples are kept."""
        samples, _ = build_samples(self._new_builder, transitions, strict=self._tamiyo_settings.strict_graph)
        self._imitation = [s for s in samples if not s.transition.on_policy_material]
        return len(self._imitation)

    def run_round(
        self, transitions: TransitionSet, *, mode: Mode = "auto", reports_received: int = 0
    ) -> RoundResult:
        """One round (see the module docstring); never raises for a refused candidate.

        `reports_received`: the distinct field reports the learner had received when the round began
        (recorded with the round, so a restarted learner knows how many came since)."""
        parent = self.policy
        result = RoundResult(
            mode="skipped", published=False, parent_version=parent.version, reports_received=reports_received
        )
        result.transitions = len(transitions.transitions)
        samples, graph_skips = build_samples(  # step 1
            self._new_builder, transitions, strict=self._tamiyo_settings.strict_graph
        )
        result.skipped = dict(transitions.skipped + graph_skips)
        on_policy = [s for s in samples if s.transition.on_policy_material]
        heuristic = [s for s in samples if not s.transition.on_policy_material]
        result.samples, result.on_policy, result.heuristic = len(samples), len(on_policy), len(heuristic)
        enough = self.settings.min_transitions
        chosen = mode
        if mode == "auto":  # step 2
            chosen = (
                "ppo" if len(on_policy) >= enough else "imitation" if len(heuristic) >= enough else "auto"
            )
        pool = on_policy if chosen == "ppo" else samples if chosen == "distil" else heuristic
        if chosen == "auto" or len(pool) < enough:
            result.reasons.append(
                f"not enough transitions: {len(on_policy)} on-policy, {len(heuristic)} heuristic "
                f"(need {enough} of one kind for mode {mode})"
            )
            return self._finish(result)
        result.mode = chosen
        candidate = self._copy(parent)
        train_rows, holdout_rows = self._split(len(pool))  # step 3
        if chosen == "ppo":
            fitted = refit_critic(candidate, pool, train_rows, self.settings)  # PPO step 0
            result.metrics["critic.refitted"] = float(fitted is not None)
            if fitted is not None:
                result.metrics["critic.refit_explained_variance"] = fitted
            rollout = make_rollout(candidate, pool, self.settings)
            stats = ppo_update(
                candidate,
                rollout.subset(train_rows),
                self.settings,
                generator=self._generator,
                imitation=self._imitation,
            )
            candidate.load_state_bytes(candidate.state_bytes())  # the version follows the new weights
            result.metrics.update(stats.as_metrics())
            report = validate_candidate(
                parent,
                candidate,
                self.settings,
                graphs=[s.graph for s in pool],
                training_losses={"policy_loss": stats.policy_loss, "value_loss": stats.value_loss},
                holdout=rollout.subset(holdout_rows),
            )
        else:
            imitation = imitate(
                candidate, [pool[i] for i in train_rows], self.settings, generator=self._generator
            )
            candidate.load_state_bytes(candidate.state_bytes())
            result.metrics.update(imitation.as_metrics())
            report = validate_candidate(
                parent,
                candidate,
                self.settings,
                graphs=[s.graph for s in pool],
                training_losses={"loss": imitation.loss, "value_loss": imitation.value_loss},
                imitation_holdout=[pool[i] for i in holdout_rows],
                kl_bound=False,  # imitation moves far from its (random) parent on purpose
                agreement_bound=chosen == "imitation",
            )
        result.metrics.update(report.metrics)
        result.version = candidate.version
        if not report.passed:  # step 5
            result.reasons.extend(report.reasons)
            _log.warning(
                "simic: candidate %s not published: %s", candidate.version, "; ".join(report.reasons)
            )
            return self._finish(result)
        self._release(candidate, result)  # step 6
        return self._finish(result)

    def reports_at_last_round(self) -> int:
        """The distinct field reports received when the last recorded round began (0 without one)."""
        rounds = self._state.rounds() if self._state is not None else []
        return int(rounds[-1].get("reports_received", 0)) if rounds else 0

    def _new_builder(self) -> GraphBuilder:
        return GraphBuilder(
            self._tamiyo_settings,
            schema=self.policy.config.schema,
            blueprint_metadata=self._blueprint_metadata,
        )

    def _copy(self, policy: GNNPolicy) -> GNNPolicy:
        copy = GNNPolicy(self._tamiyo_settings, config=policy.config, builder=policy.builder)
        copy.load_state_bytes(policy.state_bytes())
        return copy

    def _split(self, size: int) -> tuple[list[int], list[int]]:
        """Training rows in trajectory order and held-out rows (at least one of each)."""
        holdout_count = min(size - 1, max(1, round(size * self.settings.holdout_fraction)))
        order = torch.randperm(size, generator=self._generator).tolist()
        holdout = sorted(order[:holdout_count])
        train = sorted(order[holdout_count:])
        return train, holdout

    def _release(self, candidate: GNNPolicy, result: RoundResult) -> None:
        sequence = self.sequence + 1
        update = build_policy_update(
            candidate,
            self._secret,
            parent_version=result.parent_version,
            sequence=sequence,
            policy_id=self.settings.policy_id,
            training_run_id=self._training_run_id,
            validation_metrics=result.metrics,
            clock=self._clock,
        )
        if self._publish is not None:
            self._publish(update)
        if self._state is not None:
            self._state.save_policy(update.payload)
        self.policy, self.sequence = candidate, sequence
        result.published, result.sequence = True, sequence
        self.last_update = update
        _log.info(
            "simic: published %s (sequence %d, parent %s)", candidate.version, sequence, result.parent_version
        )

    def _finish(self, result: RoundResult) -> RoundResult:
        result.finished_at_ns = self._clock.wall_ns()
        if self._state is not None:
            self._state.record(result)
        return result


def bus_publisher(bus: Bus) -> Publisher:
    """Publish updates on the policy-update stream of `bus`."""

    def publish(update: pb.PolicyUpdate) -> None:
        bus.publish(Streams.POLICY_UPDATES, envelope_for(update, pb.MESSAGE_PRIORITY_HIGH))

    return publish


def serve(
    bus: Bus,
    trainer: SimicTrainer,
    *,
    group: str = "simic",
    consumer: str = "simic-0",
    should_stop: Callable[[], bool] = lambda: False,
    max_rounds: int | None = None,
    on_round: Callable[[RoundResult], None] | None = None,
    store: RecordStore | None = None,
) -> list[RoundResult]:
    """Consume decisions and field reports from the bus and train a round every
    `round_min_new_reports` new reports (distinct command ids), until `should_stop()` or `max_rounds`.

    With a `store`, every record is kept there before it is acked (see `drain_bus`), and what it holds
    is loaded first: a restarted learner continues with every record it ever took off the bus, and counts
    the reports received since its last recorded round. Records delivered to `group` and never acked (a
    learner that died between a delivery and its ack) are reclaimed first: one learner per group."""
    settings = trainer.settings
    collector = RecordCollector(max_records=settings.max_transitions)
    results: list[RoundResult] = []
    reports_at_last_round = 0
    if store is not None:
        collector.extend(store.load(newest=settings.max_transitions))
        collector.reports_received = store.count("field_report")
        reports_at_last_round = min(trainer.reports_at_last_round(), collector.reports_received)
    # What an earlier life of this learner was delivered but never acked is not delivered as new again.
    reclaim_pending(bus, collector, group=group, consumer=consumer, store=store)
    while not should_stop() and (max_rounds is None or len(results) < max_rounds):
        drain_bus(bus, collector, group=group, consumer=consumer, block_ms=settings.poll_ms, store=store)
        if collector.reports_received - reports_at_last_round < settings.round_min_new_reports:
            continue
        reports_at_last_round = collector.reports_received
        result = trainer.run_round(collector.transitions(settings), reports_received=reports_at_last_round)
        results.append(result)
        if on_round is not None:
            on_round(result)
    return results


def offline_records(
    bus: Bus, collector: RecordCollector | None = None, *, training_run_id: str = ""
) -> RecordCollector:
    """Every decision and field report on `bus` (of one run when `training_run_id` is given), read
    through a throwaway consumer group that is deleted afterwards."""
    everything = RecordCollector()
    group = f"simic-offline-{time.time_ns()}"
    try:
        drain_bus(bus, everything, group=group, consumer="simic-offline")
    finally:
        for stream in (Streams.DECISIONS, Streams.FIELD_REPORTS):
            bus.delete_group(stream, group)
    collector = collector if collector is not None else RecordCollector()
    collector.extend(
        message
        for message in everything.messages()
        if not training_run_id or message.training_run_id == training_run_id
    )
    collector.rejected.update(everything.rejected)
    return collector
