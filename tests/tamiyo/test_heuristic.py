"""Golden tests of the heuristic policy: plateau -> germinate, help -> fossilise, harm -> cull, else wait."""

from __future__ import annotations

import json

import pytest

from esper.leyline import ManualClock, pb, validate_packet
from esper.tamiyo.model.heuristic import HeuristicPolicy, HeuristicSettings, HeuristicStateError
from esper.tamiyo.model.proposal import Proposal
from esper.tamiyo.runtime.commands import CommandFactory
from esper.tamiyo.settings import TamiyoSettings

WAIT, GERMINATE, FOSSILIZE, CULL = (
    pb.POLICY_ACTION_WAIT,
    pb.POLICY_ACTION_GERMINATE,
    pb.POLICY_ACTION_FOSSILIZE,
    pb.POLICY_ACTION_CULL,
)
PLATEAU = [1.0, 0.8, 0.7, 0.7, 0.7, 0.7]  # no improvement over the last 3 evaluations after the 0.7


def seed(
    slot: str, stage: int = pb.SEED_STAGE_DORMANT, *, grad: float = 0.0, blueprint: str = "", **metrics: float
) -> pb.SeedState:
    return pb.SeedState(
        seed_id=f"seed-{slot}",
        slot_id=slot,
        stage=stage,
        gradient_norm=grad,
        blueprint_id=blueprint or ("" if stage == pb.SEED_STAGE_DORMANT else "mlp_small"),
        metrics=metrics,
    )


def packet(
    loss: float,
    seeds: list[pb.SeedState] | None = None,
    blueprints: tuple[str, ...] = ("mlp_small", "lowrank"),
) -> pb.SystemStatePacket:
    states = seeds if seeds is not None else [seed("s0"), seed("s1")]
    built = pb.SystemStatePacket(
        packet_id="p",
        training_run_id="run",
        source_subsystem="tolaria",
        validation_loss=loss,
        seed_states=states,
        blueprint_ids=list(blueprints),
    )
    for state in states:
        built.topology.slots.add(slot_id=state.slot_id, layer_id="hidden", width=32, kind="mlp")
    return validate_packet(built)


def feed(policy: HeuristicPolicy, losses: list[float], **kwargs: object) -> list[Proposal]:
    return [policy.propose(packet(loss, **kwargs)) for loss in losses]  # type: ignore[arg-type]


def measured(loss: float, accuracy: float, **more: float) -> dict[str, float]:
    return {
        "contribution_measured": 1.0,
        "contribution_loss": loss,
        "contribution_accuracy": accuracy,
        **more,
    }


@pytest.fixture
def policy() -> HeuristicPolicy:
    return HeuristicPolicy(
        HeuristicSettings(plateau_patience=3, min_improvement=0.01, germination_cooldown=3)
    )


def test_version_and_tamiyo_settings_give_defaults() -> None:
    heuristic = HeuristicPolicy(TamiyoSettings())
    assert heuristic.version == "heuristic-v2"
    # `esper run` grows layers from the first decision; the rules' own defaults leave growth off.
    assert heuristic.settings == HeuristicSettings(
        enable_growth=True, grow_early=True, last_growth_progress=0.85
    )


# --- germination -----------------------------------------------------------------------------------


def test_improving_loss_waits_with_a_reason(policy: HeuristicPolicy) -> None:
    proposals = feed(policy, [1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    assert [p.action for p in proposals] == [WAIT] * 6
    assert "not enough history" in proposals[0].reason
    assert "still improving" in proposals[-1].reason


def test_plateau_germinates_into_the_dormant_slot_with_the_highest_gradient(policy: HeuristicPolicy) -> None:
    seeds = [seed("s0", grad=0.1), seed("s1", grad=0.9), seed("s2", grad=0.5)]
    proposals = feed(policy, PLATEAU, seeds=seeds)
    actions = [p.action for p in proposals]
    # History fills after 4 evaluations; the 0.7 at index 2 still counts as improvement until it leaves
    # the window, so the first plateau is at index 5.
    assert actions == [WAIT] * 5 + [GERMINATE]
    chosen = proposals[-1]
    assert chosen.slot_id == "s1"
    assert chosen.blueprint_id == "mlp_small"
    assert chosen.blend_mode == pb.BLEND_MODE_CONVEX
    assert "plateau" in chosen.reason and "s1" in chosen.reason


def test_gradient_ties_go_to_the_first_slot(policy: HeuristicPolicy) -> None:
    seeds = [seed("s0", pb.SEED_STAGE_FOSSILIZED), seed("s1", grad=0.3), seed("s2", grad=0.3)]
    assert feed(policy, PLATEAU, seeds=seeds)[-1].slot_id == "s1"


def test_only_offered_blueprints_are_used_in_rotation() -> None:
    policy = HeuristicPolicy(
        HeuristicSettings(plateau_patience=1, germination_cooldown=1, max_active_seeds=5)
    )
    chosen = [
        p.blueprint_id
        for p in feed(policy, [1.0] * 8, blueprints=("mlp_small", "lowrank", "mlp_bottleneck"))
        if p.action == GERMINATE
    ]
    assert chosen == [
        "mlp_small",
        "lowrank",
        "mlp_bottleneck",
        "mlp_small",
        "lowrank",
        "mlp_bottleneck",
        "mlp_small",
    ]


def test_each_slot_takes_a_blueprint_of_its_own_kind_on_a_mixed_host() -> None:
    # A user's CNN with a Linear head: conv slots and an MLP slot, and blueprints of both kinds offered.
    policy = HeuristicPolicy(
        HeuristicSettings(plateau_patience=1, germination_cooldown=1, max_active_seeds=5)
    )
    offer = ("mlp_expand", "conv_se", "conv_residual")
    for slot_kind, expected in (("conv", "conv_se"), ("mlp", "mlp_expand")):
        built = pb.SystemStatePacket(
            packet_id="p",
            training_run_id="run",
            source_subsystem="tolaria",
            validation_loss=1.0,
            seed_states=[seed("s0")],
            blueprint_ids=list(offer),
        )
        built.topology.slots.add(slot_id="s0", layer_id="hidden", width=32, kind=slot_kind)
        policy.propose(validate_packet(built))  # the first evaluation: no plateau yet
        proposal = policy.propose(validate_packet(built))
        assert (proposal.action, proposal.blueprint_id) == (GERMINATE, expected), proposal.reason


def test_no_offered_blueprint_of_the_slots_kind_waits_and_says_so(policy: HeuristicPolicy) -> None:
    proposals = feed(policy, PLATEAU, blueprints=("conv_se", "conv_residual"))  # the slots are MLP slots
    assert proposals[-1].action == WAIT
    assert "fits a dormant slot's kind" in proposals[-1].reason


def test_the_preferred_blueprint_is_chosen_whenever_it_is_offered() -> None:
    policy = HeuristicPolicy(
        HeuristicSettings(
            plateau_patience=1, germination_cooldown=1, max_active_seeds=5, preferred_blueprints=("b", "c")
        )
    )
    with_c = [p.blueprint_id for p in feed(policy, [1.0] * 4, blueprints=("a", "c")) if p.action == GERMINATE]
    with_b = [p.blueprint_id for p in feed(policy, [1.0] * 2, blueprints=("c", "b")) if p.action == GERMINATE]
    assert len(with_c) >= 2 and set(with_c) == {"c"}
    assert len(with_b) >= 1 and set(with_b) == {"b"}


def test_mlp_expand_is_the_default_preference() -> None:
    policy = HeuristicPolicy(HeuristicSettings(plateau_patience=1, germination_cooldown=1))
    chosen = [
        p for p in feed(policy, [1.0] * 3, blueprints=("mlp_small", "mlp_expand")) if p.action == GERMINATE
    ]
    assert chosen and {p.blueprint_id for p in chosen} == {"mlp_expand"}


def test_no_dormant_slot_waits(policy: HeuristicPolicy) -> None:
    seeds = [seed("s0", pb.SEED_STAGE_FOSSILIZED), seed("s1", pb.SEED_STAGE_EMBARGOED, blueprint="mlp_small")]
    proposal = feed(policy, PLATEAU, seeds=seeds)[-1]
    assert proposal.action == WAIT
    assert "no DORMANT slot" in proposal.reason


def test_no_blueprint_offered_waits(policy: HeuristicPolicy) -> None:
    proposal = feed(policy, PLATEAU, blueprints=())[-1]
    assert proposal.action == WAIT
    assert "offers no blueprint" in proposal.reason


def test_active_seed_limit_blocks_germination(policy: HeuristicPolicy) -> None:
    seeds = [seed("s0", pb.SEED_STAGE_TRAINING), seed("s1")]
    proposal = feed(policy, PLATEAU, seeds=seeds)[-1]
    assert proposal.action == WAIT
    assert "1 seed(s) active (limit 1)" in proposal.reason


def test_cooldown_counts_evaluations_since_the_last_germination(policy: HeuristicPolicy) -> None:
    seeds = [seed("s0"), seed("s1")]
    settings = HeuristicSettings(plateau_patience=3, germination_cooldown=3, max_active_seeds=3)
    policy = HeuristicPolicy(settings)
    actions = [p.action for p in feed(policy, [*PLATEAU, 0.7, 0.7, 0.7, 0.7], seeds=seeds)]
    assert actions == [WAIT] * 5 + [GERMINATE, WAIT, WAIT, GERMINATE, WAIT]


# --- judging seeds ---------------------------------------------------------------------------------


def test_probationary_seed_with_positive_contribution_is_fossilised(policy: HeuristicPolicy) -> None:
    seeds = [seed("s0"), seed("s1", pb.SEED_STAGE_PROBATIONARY, **measured(0.05, 0.01))]
    proposal = policy.propose(packet(0.5, seeds))
    assert proposal.action == FOSSILIZE and proposal.slot_id == "s1"
    assert "lowers val loss by 0.05" in proposal.reason


def test_accuracy_alone_can_justify_fossilising(policy: HeuristicPolicy) -> None:
    seeds = [seed("s0", pb.SEED_STAGE_PROBATIONARY, **measured(0.0, 0.02))]
    assert policy.propose(packet(0.5, seeds)).action == FOSSILIZE


def test_shadowing_seed_that_helps_is_left_to_finish_its_gates(policy: HeuristicPolicy) -> None:
    seeds = [seed("s0", pb.SEED_STAGE_SHADOWING, **measured(0.05, 0.01))]
    assert policy.propose(packet(0.5, seeds)).action == WAIT


@pytest.mark.parametrize("stage", [pb.SEED_STAGE_SHADOWING, pb.SEED_STAGE_PROBATIONARY])
@pytest.mark.parametrize(("loss", "accuracy"), [(-0.05, 0.0), (-0.05, -0.02), (0.0, -0.03)])
def test_clearly_harmful_seed_is_culled(
    policy: HeuristicPolicy, stage: int, loss: float, accuracy: float
) -> None:
    seeds = [seed("s0"), seed("s1", stage, **measured(loss, accuracy))]
    proposal = policy.propose(packet(0.5, seeds))
    assert proposal.action == CULL and proposal.slot_id == "s1"
    assert "removing it changes val loss" in proposal.reason


def test_slightly_negative_contribution_is_not_clear_enough_to_cull(policy: HeuristicPolicy) -> None:
    seeds = [seed("s0", pb.SEED_STAGE_SHADOWING, **measured(-0.001, 0.0))]
    assert policy.propose(packet(0.5, seeds)).action == WAIT


@pytest.mark.parametrize(
    "metrics",
    [
        {},
        {"contribution_loss": 0.5, "contribution_accuracy": 0.1},
        {"contribution_measured": 0.0, "contribution_loss": 0.5, "contribution_accuracy": 0.1},
        {"contribution_measured": 1.0, "contribution_accuracy": 0.1},
        {"contribution_measured": 1.0, "contribution_loss": -0.5},
        {"contribution_measured": 1.0, "contribution_loss": float("nan"), "contribution_accuracy": 0.1},
    ],
)
def test_unmeasured_contribution_is_neither_fossilised_nor_culled(
    policy: HeuristicPolicy, metrics: dict[str, float]
) -> None:
    for stage in (pb.SEED_STAGE_SHADOWING, pb.SEED_STAGE_PROBATIONARY):
        proposal = policy.propose(packet(0.5, [seed("s0", stage, **metrics)]))
        assert proposal.action == WAIT, proposal


def test_seed_stuck_too_long_is_culled() -> None:
    policy = HeuristicPolicy(HeuristicSettings(max_judged_stage_steps=100))
    fine = policy.propose(packet(0.5, [seed("s0", pb.SEED_STAGE_SHADOWING, stage_steps=100.0)]))
    stuck = policy.propose(packet(0.5, [seed("s0", pb.SEED_STAGE_SHADOWING, stage_steps=101.0)]))
    assert fine.action == WAIT
    assert stuck.action == CULL and "stuck for 101 steps" in stuck.reason


def test_training_seeds_are_not_judged(policy: HeuristicPolicy) -> None:
    seeds = [seed("s0", pb.SEED_STAGE_TRAINING, stage_steps=10_000.0, **measured(-1.0, -1.0))]
    assert policy.propose(packet(0.5, seeds)).action == WAIT


def test_fossilise_can_wait_for_a_minimum_stage_dwell() -> None:
    policy = HeuristicPolicy(HeuristicSettings(fossilize_min_stage_steps=20))
    early = [seed("s0", pb.SEED_STAGE_PROBATIONARY, stage_steps=5.0, **measured(0.1, 0.0))]
    late = [seed("s0", pb.SEED_STAGE_PROBATIONARY, stage_steps=20.0, **measured(0.1, 0.0))]
    assert policy.propose(packet(0.5, early)).action == WAIT
    assert policy.propose(packet(0.5, late)).action == FOSSILIZE


# --- commands and checkpoints ------------------------------------------------------------------------


def test_every_proposal_becomes_a_signed_command_with_its_reason(policy: HeuristicPolicy) -> None:
    factory = CommandFactory(b"0123456789abcdef-test-key", ManualClock())
    judged = [seed("s0"), seed("s1", pb.SEED_STAGE_PROBATIONARY, **measured(0.1, 0.0))]
    for loss in PLATEAU:
        current = packet(loss)
        proposal = policy.propose(current)
        command = factory.build(proposal, current)
        assert command.annotations["reason"] == proposal.reason != ""
        assert command.signature
    fossilize = factory.build(policy.propose(packet(0.7, judged)), packet(0.7, judged))
    assert fossilize.seed_operation.operation == pb.SEED_OP_FOSSILIZE
    assert fossilize.target_seed_id == "seed-s1"


def test_state_round_trips_through_json_and_continues_identically() -> None:
    settings = HeuristicSettings(plateau_patience=3, germination_cooldown=2, max_active_seeds=4)
    original, copy = HeuristicPolicy(settings), HeuristicPolicy(settings)
    feed(original, PLATEAU)
    copy.restore(json.loads(json.dumps(original.state())))
    assert copy.state() == original.state()
    tail = [0.7, 0.71, 0.69, 0.7, 0.7, 0.7]
    assert feed(copy, tail) == feed(original, tail)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"version": "heuristic-v0"}, "version"),
        ({"recent_losses": "nope"}, "recent_losses"),
        ({"recent_losses": [1.0, float("nan")]}, "recent_losses"),
        ({"recent_losses": [1.0, 1.0, 1.0, 1.0]}, "recent_losses"),
        ({"best_before": "x"}, "best_before"),
        ({"evaluations_since_germination": -1}, "evaluations_since_germination"),
        ({"germinations": True}, "germinations"),
    ],
)
def test_malformed_state_is_refused(policy: HeuristicPolicy, change: dict[str, object], field: str) -> None:
    before = policy.state()
    with pytest.raises(HeuristicStateError) as info:
        policy.restore(before | change)
    assert info.value.field == field
    assert policy.state() == before


def test_invalid_settings_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="alpha_ramp_steps"):
        HeuristicSettings(alpha_ramp_steps=7)
    with pytest.raises(ValueError, match="plateau_patience"):
        HeuristicSettings(plateau_patience=0)


# --- growth budget ---------------------------------------------------------------------------------


def _budgeted_packet(loss: float, max_parameters: int, param_count: float) -> pb.SystemStatePacket:
    built = packet(loss, blueprints=("mlp_expand", "lowrank"))
    built.max_parameters = max_parameters
    built.training_metrics["param_count"] = param_count
    return built


def test_under_a_budget_the_heuristic_takes_the_next_blueprint_that_fits() -> None:
    from esper.urza import param_count

    expand, lowrank = param_count("mlp_expand", 32, "mlp"), param_count("lowrank", 32, "mlp")
    assert lowrank < expand
    policy = HeuristicPolicy(HeuristicSettings(plateau_patience=1, germination_cooldown=0))
    proposals = [policy.propose(_budgeted_packet(1.0, 1000 + lowrank, 1000.0)) for _ in range(3)]
    chosen = [p for p in proposals if p.action == GERMINATE]
    assert chosen and {p.blueprint_id for p in chosen} == {"lowrank"}


def test_at_the_budget_the_heuristic_waits_and_says_so() -> None:
    policy = HeuristicPolicy(HeuristicSettings(plateau_patience=1, germination_cooldown=0))
    proposals = [policy.propose(_budgeted_packet(1.0, 1000, 1000.0)) for _ in range(3)]
    assert [p.action for p in proposals] == [WAIT] * 3
    assert "no germination fits the growth budget" in proposals[-1].reason
    assert "> max_parameters 1000" in proposals[-1].reason
