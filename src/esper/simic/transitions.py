"""Decision records and field reports -> transitions Simic can learn from.

A decision (`DecisionRecord`: the packet, the factored choice with its behaviour log-probability and
value, the policy version) is joined with its field report (the measured outcome over the observation
window) by `command_id`. The reward comes from the report (`reward.py`). Decisions of one training run,
in step order, form one trajectory; its last decision ends it.

A decision is *on-policy material* (usable by PPO) when the policy that made it sampled from Tamiyo's
own policy class and recorded per-head log-probabilities. The heuristic's decisions carry no
log-probability: they serve the imitation bootstrap only. Whatever cannot be used is counted by reason,
never dropped silently.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from esper.leyline import EsperError, pb
from esper.oona import Bus, Delivery, Streams, open_envelope
from esper.simic.records import RecordStore
from esper.simic.reward import (
    CONTRIBUTION_ACCURACY,
    END_CONTRIBUTION_ACCURACY,
    Reward,
    UnmeasuredOutcome,
    episode_objective,
    episode_step_reward,
    reward_of,
    with_seed_outcome,
)
from esper.simic.settings import SimicSettings
from esper.tamiyo.model.builder import GraphBuilder
from esper.tamiyo.model.distributions import RELEVANT_HEADS
from esper.tamiyo.model.graph import TamiyoGraph
from esper.tamiyo.model.normalizer_state import statistics_from_proto
from esper.tamiyo.model.proposal import ACTIONS, ALPHA_RAMP_STEPS, BLEND_MODES, WIDEN_UNITS
from esper.tamiyo.model.schema import GraphSchemaError, MissingFeatureError

# The command type each action becomes when the risk gates let it through.
COMMAND_OF_ACTION: dict[int, int] = {
    pb.POLICY_ACTION_WAIT: pb.COMMAND_WAIT,
    pb.POLICY_ACTION_GERMINATE: pb.COMMAND_SEED,
    pb.POLICY_ACTION_FOSSILIZE: pb.COMMAND_SEED,
    pb.POLICY_ACTION_CULL: pb.COMMAND_SEED,
    pb.POLICY_ACTION_ADJUST_LR: pb.COMMAND_OPTIMIZER,
    pb.POLICY_ACTION_PAUSE: pb.COMMAND_PAUSE,
    pb.POLICY_ACTION_WIDEN: pb.COMMAND_SEED,
    pb.POLICY_ACTION_DEEPEN: pb.COMMAND_SEED,
}


@dataclass(frozen=True)
class Transition:
    """One decision with its outcome."""

    decision: pb.DecisionRecord
    report: pb.FieldReport
    reward: Reward
    done: bool

    @property
    def on_policy_material(self) -> bool:
        """True when the decision was sampled by the GNN with recorded per-head log-probabilities."""
        choices = self.decision.head_choices
        return (
            "action" in choices and "action" in self.decision.head_log_probs and self.decision.log_prob <= 0
        )


@dataclass(frozen=True)
class Sample:
    """A transition with its graph and the choice as head indices local to that graph."""

    transition: Transition
    graph: TamiyoGraph
    choices: dict[str, int]

    @property
    def reward(self) -> float:
        """The transition's reward."""
        return self.transition.reward.total

    @property
    def old_log_prob(self) -> float:
        """Behaviour log-probability of the whole factored choice."""
        return float(self.transition.decision.log_prob)


@dataclass
class TransitionSet:
    """Transitions, in trajectory order, and what could not be used (reason -> count).

    `outcomes` says, for the germinations, WIDENs and DEEPENs among the transitions, how many were
    credited their seed's or growth's contribution at the end of its life ("credited"), how many started
    something that ended unmeasured ("ended_unmeasured") and how many something not ended in the records
    ("not_ended"): the last two add nothing to the reward, which is not the same as adding 0 measured.
    """

    transitions: list[Transition] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)


class RecordCollector:
    """Decisions and field reports as they arrive (any order), joined into transitions on demand.

    Keeps at most `max_records` of each kind (the oldest go first), so a long-running learner is bounded.
    `reports_received` counts the distinct field reports ever added (by command id): a copy of a report
    held already is not new, and an evicted one stays counted.
    """

    def __init__(self, max_records: int = 100_000) -> None:
        self._max = max_records
        self._decisions: OrderedDict[str, pb.DecisionRecord] = OrderedDict()
        self._reports: OrderedDict[str, pb.FieldReport] = OrderedDict()
        self.rejected: Counter[str] = Counter()
        self.reports_received = 0

    @property
    def report_count(self) -> int:
        """Field reports held."""
        return len(self._reports)

    def add_decision(self, record: pb.DecisionRecord) -> None:
        """Keep a decision record (the newest copy of a command id wins)."""
        if not record.command_id:
            self.rejected["decision_without_command_id"] += 1
            return
        self._decisions[record.command_id] = record
        self._decisions.move_to_end(record.command_id)
        while len(self._decisions) > self._max:
            self._decisions.popitem(last=False)

    def add_report(self, report: pb.FieldReport) -> None:
        """Keep a field report (one per command id; the newest wins)."""
        if report.command_id not in self._reports:
            self.reports_received += 1
        self._reports[report.command_id] = report
        self._reports.move_to_end(report.command_id)
        while len(self._reports) > self._max:
            self._reports.popitem(last=False)

    def extend(self, messages: Iterable[pb.DecisionRecord | pb.FieldReport]) -> None:
        """Add decisions and reports from any iterable (tests, offline files)."""
        for message in messages:
            if isinstance(message, pb.DecisionRecord):
                self.add_decision(message)
            else:
                self.add_report(message)

    def messages(self) -> list[pb.DecisionRecord | pb.FieldReport]:
        """Every record held (decisions first)."""
        return [*self._decisions.values(), *self._reports.values()]

    def transitions(self, settings: SimicSettings) -> TransitionSet:
        """Every decision that has its report, as trajectories per run in step order."""
        result = TransitionSet()
        runs: dict[str, list[tuple[pb.DecisionRecord, pb.FieldReport, Reward | None]]] = {}
        for command_id, decision in self._decisions.items():
            report = self._reports.get(command_id)
            if report is None:
                result.skipped["no_field_report_yet"] += 1
                continue
            if decision.final_command_type and decision.final_command_type != COMMAND_OF_ACTION.get(
                decision.action
            ):
                # The risk gates issued something else: the outcome is not the chosen action's to claim.
                result.skipped["overridden_by_risk_gate"] += 1
                continue
            reward: Reward | None
            try:
                reward = reward_of(report, settings)
            except UnmeasuredOutcome:
                result.skipped["outcome_not_measured"] += 1
                reward = None  # no transition, but a FOSSILIZE or CULL still tells its end figure
            runs.setdefault(decision.training_run_id, []).append((decision, report, reward))
        result.skipped["report_without_decision"] = sum(
            1 for command_id in self._reports if command_id not in self._decisions
        )
        for run_id in sorted(runs):
            credited = _credit_growth_outcomes(
                sorted(
                    runs[run_id],
                    key=lambda item: (item[0].packet.global_step, item[0].issued_at.ToNanoseconds()),
                ),
                settings,
                result.outcomes,
            )
            steps = [
                (decision, report, reward) for decision, report, reward in credited if reward is not None
            ]
            if not steps:
                continue
            if settings.reward_mode == "episode":
                objective = episode_objective(steps[-1][0], steps[-1][1], settings)
                steps = [
                    (
                        decision,
                        report,
                        episode_step_reward(reward, last=index == len(steps) - 1, objective=objective),
                    )
                    for index, (decision, report, reward) in enumerate(steps)
                ]
            for index, (decision, report, reward) in enumerate(steps):
                result.transitions.append(
                    Transition(decision=decision, report=report, reward=reward, done=index == len(steps) - 1)
                )
        result.skipped += Counter()  # drops zero counts
        return result


_LIFE_ENDS = frozenset({pb.POLICY_ACTION_FOSSILIZE, pb.POLICY_ACTION_CULL})
# What a start's growth id looks like: `<layer>:w<n>` for a WIDEN, `<layer>:d<n>` for a DEEPEN.
_GROWTH_LETTER = {pb.POLICY_ACTION_WIDEN: "w", pb.POLICY_ACTION_DEEPEN: "d"}

_Step = tuple[pb.DecisionRecord, pb.FieldReport, Reward | None]


def _end_figure(report: pb.FieldReport) -> float | None:
    """The contribution a FOSSILIZE or CULL report measured for what it ended (None: unmeasured). Reports
    written before `END_CONTRIBUTION_ACCURACY` existed carry a seed's figure at window close instead."""
    for key in (END_CONTRIBUTION_ACCURACY, CONTRIBUTION_ACCURACY):
        value = float(report.metrics.get(key, math.nan))
        if math.isfinite(value):
            return value
    return None


def _started_id(decision: pb.DecisionRecord, report: pb.FieldReport, pending: dict[str, float | None]) -> str:
    """The id of the seed or growth a germination, WIDEN or DEEPEN started, as the ends know it.

    A germination's report names its seed; a growth's names its growth while the packets still carried it
    at window close (`growth_stage` is then set), else its layer: the growth was kept (a widen merged into
    the layer) or culled within the window. Then it is the nearest later growth of that operation on the
    layer with an end in the records (one growth per layer at a time, so no other can come between)."""
    seed_id = str(report.seed_id)
    letter = _GROWTH_LETTER.get(decision.action)
    if letter is None or "growth_stage" in report.metrics:
        return seed_id
    prefix = f"{decision.growth.layer_id or seed_id}:{letter}"
    later = [key for key in pending if key.startswith(prefix) and key[len(prefix) :].isdigit()]
    return later[-1] if later else seed_id


def _credit_growth_outcomes(
    steps: list[_Step], settings: SimicSettings, outcomes: Counter[str]
) -> list[_Step]:
    """Each germination, WIDEN or DEEPEN of one run (in step order) also earns the counterfactual
    contribution of the seed or growth it started, as measured at its end: the last FOSSILIZE or CULL of
    that seed or growth before it is started again (see `reward.with_seed_outcome`; a slot's seed id comes
    back after a reset, so "before" matters). A FOSSILIZE that Kasmina refused (G4 not passed yet) is
    followed by the one that kept it; the records do not say which were refused, the last is the end.
    One that ended unmeasured, or was still alive when the records end, adds nothing and is counted in
    `outcomes`. Steps without a reward (`None`: unmeasured windows) still tell their ends."""
    credited = list(steps)
    pending: dict[str, float | None] = {}  # id -> contribution at the end of its life (None: unmeasured)
    for index in range(len(credited) - 1, -1, -1):
        decision, report, reward = credited[index]
        if decision.action in _LIFE_ENDS:
            # The last attempt of a life is its end: an earlier one was refused (a FOSSILIZE before G4
            # passed), or it would have been the last. Set once per life, in the order lives end.
            if report.seed_id and report.seed_id not in pending:
                pending[report.seed_id] = _end_figure(report)
            continue
        if decision.action != pb.POLICY_ACTION_GERMINATE and decision.action not in _GROWTH_LETTER:
            continue
        started = _started_id(decision, report, pending) if report.seed_id else ""
        if started not in pending:
            if reward is not None:
                outcomes["not_ended"] += 1
            continue
        value = pending.pop(started)
        if reward is None:
            continue
        if value is None:
            outcomes["ended_unmeasured"] += 1
            continue
        outcomes["credited"] += 1
        credited[index] = (decision, report, with_seed_outcome(reward, value, settings))
    return credited


def drain_bus(
    bus: Bus,
    collector: RecordCollector,
    *,
    group: str,
    consumer: str,
    block_ms: int = 0,
    store: RecordStore | None = None,
) -> int:
    """Move every decision record and field report waiting for `group` into `collector`; returns how many
    were taken off the bus.

    With a `store`, each batch is written there (one transaction) before it is acked, and only the
    records it did not hold already reach `collector`: a learner killed after the ack loses nothing, and a
    redelivered copy is held once. Without one, messages are acked once held in memory. A message that does
    not open as its type, or that has no command id, is counted in `collector.rejected` and acked (it
    would never be usable).
    """
    moved = 0
    for stream, message_type in _RECORD_STREAMS:
        bus.ensure_group(stream, group, from_beginning=True)
        wait = block_ms
        while True:
            deliveries = bus.consume(stream, group, consumer, count=256, block_ms=wait)
            wait = 0
            if not deliveries:
                break
            moved += _take(bus, stream, group, message_type, deliveries, collector=collector, store=store)
    return moved


def reclaim_pending(
    bus: Bus, collector: RecordCollector, *, group: str, consumer: str, store: RecordStore | None = None
) -> int:
    """Take over every record delivered to `group` but never acked (a learner that died between a
    delivery and its ack: the bus never delivers those as new again), and hold them as `drain_bus` does;
    returns how many. For a learner's start, when no other consumer of `group` is at work."""
    moved = 0
    for stream, message_type in _RECORD_STREAMS:
        bus.ensure_group(stream, group, from_beginning=True)
        while deliveries := bus.reclaim(stream, group, consumer, min_idle_ms=0, count=256):
            moved += _take(bus, stream, group, message_type, deliveries, collector=collector, store=store)
    return moved


_RECORD_STREAMS: tuple[tuple[str, type[pb.DecisionRecord] | type[pb.FieldReport]], ...] = (
    (Streams.DECISIONS, pb.DecisionRecord),
    (Streams.FIELD_REPORTS, pb.FieldReport),
)


def _take(
    bus: Bus,
    stream: str,
    group: str,
    message_type: type[pb.DecisionRecord] | type[pb.FieldReport],
    deliveries: list[Delivery],
    *,
    collector: RecordCollector,
    store: RecordStore | None,
) -> int:
    """Open one batch of deliveries, keep it (in `store` first, when there is one), then ack it."""
    opened: list[pb.DecisionRecord | pb.FieldReport] = []
    for delivery in deliveries:
        try:
            message = open_envelope(delivery.envelope, message_type)
        except EsperError as exc:
            collector.rejected[f"{message_type.DESCRIPTOR.name}:{type(exc).__name__}"] += 1
            continue
        if not message.command_id:
            collector.rejected[f"{message_type.DESCRIPTOR.name}:no_command_id"] += 1
            continue
        opened.append(message)
    collector.extend(opened if store is None else store.add(opened))
    bus.ack(stream, group, [d.message_id for d in deliveries])
    return len(opened)


class ChoiceUnresolvable(EsperError):
    """A recorded choice does not name something of the rebuilt graph."""

    def __init__(self, command_id: str, reason: str) -> None:
        self.command_id = command_id
        self.reason = reason
        super().__init__(f"decision {command_id}: {reason}")


def resolve_choices(decision: pb.DecisionRecord, graph: TamiyoGraph) -> dict[str, int]:  # noqa: C901, PLR0912 (each head of the factored action checked against the graph in turn)
    """The decision's factored choice as head indices local to `graph`, checked against the graph.

    The GNN records `head_choices` directly; for the heuristic they are recovered from the action, slot
    and blueprint it named (its blend mode and schedule only when recorded).
    """
    choices = {str(head): int(index) for head, index in decision.head_choices.items()}
    if "action" not in choices:
        if decision.action not in ACTIONS:
            raise ChoiceUnresolvable(decision.command_id, f"action {decision.action} is not a head option")
        choices["action"] = ACTIONS.index(decision.action)
        if decision.slot_id:
            if decision.slot_id not in graph.slot_ids:
                raise ChoiceUnresolvable(
                    decision.command_id, f"slot {decision.slot_id!r} is not in the graph"
                )
            choices["slot"] = graph.slot_ids.index(decision.slot_id)
        if decision.blueprint_id and decision.action == pb.POLICY_ACTION_GERMINATE:
            if decision.blueprint_id not in graph.blueprint_ids:
                raise ChoiceUnresolvable(
                    decision.command_id, f"blueprint {decision.blueprint_id!r} is not in the graph"
                )
            choices["blueprint"] = graph.blueprint_ids.index(decision.blueprint_id)
        if decision.action in (pb.POLICY_ACTION_WIDEN, pb.POLICY_ACTION_DEEPEN):
            choices.update(_growth_choices(decision, graph))
    action = choices["action"]
    if not 0 <= action < len(ACTIONS) or not bool(graph.action_mask[0, action]):
        raise ChoiceUnresolvable(decision.command_id, f"action index {action} is not legal in the graph")
    limits = {
        "slot": len(graph.slot_ids),
        "blueprint": len(graph.blueprint_ids),
        "blend": len(BLEND_MODES),
        "schedule": len(ALPHA_RAMP_STEPS),
        "layer": len(graph.layer_ids),
        "amount": len(WIDEN_UNITS),
    }
    for head in RELEVANT_HEADS[action]:
        if head == "action" or head not in choices:
            continue
        if head in limits and not 0 <= choices[head] < limits[head]:
            raise ChoiceUnresolvable(decision.command_id, f"{head} index {choices[head]} is out of range")
    for head in ("slot", "blueprint", "layer", "amount"):
        if head in RELEVANT_HEADS[action] and head not in choices:
            raise ChoiceUnresolvable(decision.command_id, f"the action needs a {head} and none was recorded")
    if "slot" in RELEVANT_HEADS[action] and not bool(graph.slot_action_mask[choices["slot"], action]):
        raise ChoiceUnresolvable(
            decision.command_id, f"slot index {choices['slot']} is illegal for the action"
        )
    if "layer" in RELEVANT_HEADS[action] and not bool(graph.layer_action_mask[choices["layer"], action]):
        raise ChoiceUnresolvable(
            decision.command_id, f"layer index {choices['layer']} is illegal for the action"
        )
    if "amount" in RELEVANT_HEADS[action] and not bool(
        graph.widen_amount_mask[choices["layer"], choices["amount"]]
    ):
        raise ChoiceUnresolvable(
            decision.command_id, f"amount index {choices['amount']} is illegal for the chosen layer"
        )
    return choices


def _growth_choices(decision: pb.DecisionRecord, graph: TamiyoGraph) -> dict[str, int]:
    """A policy-without-heads' WIDEN / DEEPEN as layer and amount indices: the recorded layer, and the
    amount option nearest (in log scale, the smaller on a tie) to its units among those the graph allows
    at that layer (the heuristic widens by a fraction of the width, which need not be an option)."""
    layer_id = decision.growth.layer_id
    if layer_id not in graph.layer_ids:
        raise ChoiceUnresolvable(decision.command_id, f"growth layer {layer_id!r} is not in the graph")
    layer = graph.layer_ids.index(layer_id)
    if decision.action == pb.POLICY_ACTION_DEEPEN:
        return {"layer": layer}
    allowed = [k for k in range(len(WIDEN_UNITS)) if bool(graph.widen_amount_mask[layer, k])]
    units = int(decision.growth.units)
    if units < 1 or not allowed:
        raise ChoiceUnresolvable(
            decision.command_id, f"widen of {layer_id!r} by {units}: no amount option is allowed there"
        )
    nearest = min(allowed, key=lambda k: (abs(math.log(WIDEN_UNITS[k] / units)), WIDEN_UNITS[k]))
    return {"layer": layer, "amount": nearest}


def build_samples(
    new_builder: Callable[[], GraphBuilder], transitions: TransitionSet, *, strict: bool = False
) -> tuple[list[Sample], Counter[str]]:
    """Graphs for every transition, rebuilt exactly as Tamiyo built them when it decided.

    `strict`: a packet that lacks a feature the graph expects raises `MissingFeatureError` (a learner
    must not train on inputs that were silently zeroed); otherwise it is counted and skipped.

    A decision that records the normaliser statistics its graph was made with (every decision of a graph
    policy) is rebuilt with those statistics, so the learner evaluates the actor's very inputs. One that
    records none (the heuristic's: it saw no graph) is normalised with running statistics that start
    fresh with its run, fed the run's packets in step order, as a fresh Tamiyo would have.
    """
    samples: list[Sample] = []
    skipped: Counter[str] = Counter()
    builders: dict[str, GraphBuilder] = {}
    pinned: GraphBuilder | None = None
    for transition in transitions.transitions:
        decision = transition.decision
        try:
            if decision.normalizer:
                pinned = pinned or new_builder()
                _pin_normalizer(pinned, decision)
                graph = pinned.build(decision.packet, update_stats=False)
            else:
                builder = builders.setdefault(decision.training_run_id, new_builder())
                graph = builder.build(decision.packet, update_stats=True)
            choices = resolve_choices(decision, graph)
        except ChoiceUnresolvable:
            skipped["choice_not_in_graph"] += 1
            continue
        except MissingFeatureError:
            if strict:
                raise
            skipped["graph:MissingFeatureError"] += 1
            continue
        except EsperError as exc:
            skipped[f"graph:{type(exc).__name__}"] += 1
            continue
        if transition.on_policy_material and not math.isfinite(decision.log_prob):
            skipped["log_prob_not_finite"] += 1
            continue
        samples.append(Sample(transition=transition, graph=graph, choices=choices))
    return samples, skipped


def _pin_normalizer(builder: GraphBuilder, decision: pb.DecisionRecord) -> None:
    """Make `builder` normalise with the statistics `decision` records, which must cover every node type
    (a `GraphSchemaError` otherwise: statistics left over from another decision would slip in)."""
    states = statistics_from_proto(decision.normalizer)
    expected = builder.schema.type_names
    if sorted(states) != sorted(expected) or len(states) != len(decision.normalizer):
        raise GraphSchemaError(
            f"decision {decision.command_id} normaliser",
            f"records node types {sorted(s.node_type for s in decision.normalizer)}, "
            f"the schema has {sorted(expected)}",
        )
    builder.normalizer.load_states(states)
