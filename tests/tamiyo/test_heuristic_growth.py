"""Golden tests of the heuristic's growth rule: widen where it pays, deepen where width stopped paying,
judge growths like seeds, keep the budget; and growth proposals through the factory and the gates."""

from __future__ import annotations

import pytest
from torch import nn

from esper.kasmina.deepen import IdentityBlock
from esper.kasmina.widen import set_width
from esper.leyline import ManualClock, SignatureVerifier, load_settings, pb, validate_command
from esper.tamiyo.model.budget import growth_over_budget, growth_parameter_cost
from esper.tamiyo.model.heuristic import HeuristicPolicy, HeuristicSettings, HeuristicStateError
from esper.tamiyo.model.proposal import ACTIONS, Proposal
from esper.tamiyo.runtime.commands import CommandFactory
from esper.tamiyo.runtime.risk import RiskContext, RiskGates
from esper.tamiyo.settings import TamiyoSettings
from esper.tolaria.hosts import build_host

WAIT, GERMINATE, FOSSILIZE, CULL = (
    pb.POLICY_ACTION_WAIT,
    pb.POLICY_ACTION_GERMINATE,
    pb.POLICY_ACTION_FOSSILIZE,
    pb.POLICY_ACTION_CULL,
)
WIDEN, DEEPEN = pb.POLICY_ACTION_WIDEN, pb.POLICY_ACTION_DEEPEN
SECRET = b"heuristic-growth-secret-0123456789"


def host_packet(
    loss: float,
    *,
    host: str = "mlp",
    width: int = 4,
    growths: list[pb.SeedState] | None = None,
    slot_stages: dict[str, int] | None = None,
    max_parameters: int = 0,
) -> pb.SystemStatePacket:
    """A packet with a real host's topology (a narrow MLP by default)."""
    shapes = {"mlp": (64,), "transformer": (12,)}
    built = build_host(host, shapes[host], 10, width=width, vocab_size=16)
    packet = pb.SystemStatePacket(
        packet_id="p",
        training_run_id="run",
        source_subsystem="tolaria",
        validation_loss=loss,
        blueprint_ids=["mlp_small"],
        max_parameters=max_parameters,
    )
    packet.topology.CopyFrom(built.topology())
    packet.training_metrics["param_count"] = float(built.parameter_count())
    for slot in packet.topology.slots:
        stage = (slot_stages or {}).get(slot.slot_id, pb.SEED_STAGE_DORMANT)
        packet.seed_states.add(
            seed_id=f"seed-{slot.slot_id}",
            slot_id=slot.slot_id,
            stage=stage,
            blueprint_id="" if stage == pb.SEED_STAGE_DORMANT else "mlp_small",
        )
    packet.growth_states.extend(growths or [])
    return packet


def growth(growth_id: str, stage: int, kind: str = "widen", **metrics: float) -> pb.SeedState:
    return pb.SeedState(seed_id=growth_id, slot_id=growth_id, stage=stage, blueprint_id=kind, metrics=metrics)


def measured(loss: float, accuracy: float, params: float, **more: float) -> dict[str, float]:
    return {
        "contribution_measured": 1.0,
        "contribution_loss": loss,
        "contribution_accuracy": accuracy,
        "param_count": params,
        "fossilize_ready": 1.0,
        **more,
    }


def policy(**overrides: object) -> HeuristicPolicy:
    settings: dict[str, object] = {
        "plateau_patience": 1,
        "germination_cooldown": 0,
        "enable_growth": True,
        **overrides,
    }
    return HeuristicPolicy(HeuristicSettings(**settings))  # type: ignore[arg-type]


def test_a_plateau_widens_the_narrowest_layer_by_its_width_with_gradmax() -> None:
    heuristic = policy()
    heuristic.propose(host_packet(1.0))
    packet = host_packet(1.0)
    packet.topology.layers[1].width = 3  # fc2 narrower than fc1: the bottleneck
    packet.topology.layers[1].parameter_count = 3 * 5
    chosen = heuristic.propose(packet)
    assert chosen.action == WIDEN and chosen.layer_id == "fc2"
    assert chosen.units == 3 and chosen.growth_init == pb.GROWTH_INIT_GRADMAX
    assert "plateau" in chosen.reason


def test_an_improving_host_is_not_grown() -> None:
    heuristic = policy(growth_min_improvement=0.1)
    heuristic.propose(host_packet(1.0))
    chosen = heuristic.propose(host_packet(0.8))
    assert chosen.action == WAIT and "still improving" in chosen.reason


def test_nothing_grows_while_a_growth_is_active() -> None:
    heuristic = policy()
    active = [growth("fc1:w1", pb.SEED_STAGE_TRAINING)]
    heuristic.propose(host_packet(1.0, growths=active))
    chosen = heuristic.propose(host_packet(1.0, growths=active))
    assert chosen.action == WAIT and "active" in chosen.reason


def test_a_layer_past_a_busy_slot_is_not_widened() -> None:
    heuristic = policy()
    heuristic.propose(host_packet(1.0))
    chosen = heuristic.propose(host_packet(1.0, slot_stages={"h1": pb.SEED_STAGE_FOSSILIZED}))
    assert chosen.action == WIDEN and chosen.layer_id == "fc2"


def test_a_paying_widen_is_fossilised_and_growth_continues_without_a_plateau() -> None:
    heuristic = policy(growth_min_improvement=0.0)
    probation = [growth("fc1:w1", pb.SEED_STAGE_PROBATIONARY, **measured(0.2, 0.1, 292))]
    heuristic.propose(host_packet(1.0, growths=probation))
    kept = heuristic.propose(host_packet(0.9, growths=probation))
    assert kept.action == FOSSILIZE and kept.slot_id == "fc1:w1"
    assert "per added parameter" in kept.reason
    grown = heuristic.propose(host_packet(0.5, width=8))
    assert grown.action == WIDEN and "growth pays" in grown.reason


def test_a_growth_not_yet_ready_is_not_fossilised() -> None:
    heuristic = policy()
    state = growth("fc1:w1", pb.SEED_STAGE_PROBATIONARY, **measured(0.2, 0.1, 292, fossilize_ready=0.0))
    assert heuristic.propose(host_packet(1.0, growths=[state])).action == WAIT


def test_a_harmful_widen_is_culled_and_its_layer_is_deepened_instead() -> None:
    heuristic = policy()
    hurting = [growth("fc1:w1", pb.SEED_STAGE_SHADOWING, **measured(-0.2, -0.1, 292))]
    heuristic.propose(host_packet(1.0, growths=hurting))
    culled = heuristic.propose(host_packet(1.0, growths=hurting))
    assert culled.action == CULL and culled.slot_id == "fc1:w1"
    # fc2 still widens first; once it stops paying too, depth is tried after fc1, then fc2.
    nxt = heuristic.propose(host_packet(1.0))
    assert nxt.action == WIDEN and nxt.layer_id == "fc2"
    probation = [growth("fc2:w2", pb.SEED_STAGE_PROBATIONARY, **measured(1e-4, 0.0, 60))]
    assert heuristic.propose(host_packet(1.0, growths=probation)).action == FOSSILIZE
    deepen = heuristic.propose(host_packet(1.0))
    assert deepen.action == DEEPEN and deepen.layer_id == "fc1" and "culled" in deepen.reason
    deepen2 = heuristic.propose(host_packet(1.0))
    assert deepen2.action == DEEPEN and deepen2.layer_id == "fc2" and "per parameter" in deepen2.reason
    # Every growth tried: the rule falls through to germination.
    assert heuristic.propose(host_packet(1.0)).action == GERMINATE


def test_a_widen_culled_by_kasmina_stops_its_layer() -> None:
    heuristic = policy()
    heuristic.propose(host_packet(1.0, growths=[growth("fc1:w1", pb.SEED_STAGE_EMBARGOED)]))
    chosen = heuristic.propose(host_packet(1.0))
    assert chosen.action == WIDEN and chosen.layer_id == "fc2"


def test_the_transformer_widens_its_feed_forward_layer_only() -> None:
    heuristic = policy()
    heuristic.propose(host_packet(1.0, host="transformer"))
    chosen = heuristic.propose(host_packet(1.0, host="transformer"))
    assert chosen.action == WIDEN and chosen.layer_id == "ff1"


def test_a_layer_that_cannot_widen_is_deepened_once_width_stops_paying() -> None:
    heuristic = policy()
    heuristic.propose(host_packet(1.0, host="transformer", growths=[growth("ff1:w1", pb.SEED_STAGE_CULLED)]))
    first = heuristic.propose(host_packet(1.0, host="transformer"))
    assert (first.action, first.layer_id) == (DEEPEN, "ff1")
    second = heuristic.propose(host_packet(1.0, host="transformer"))
    assert (second.action, second.layer_id) == (DEEPEN, "proj1") and "cannot widen" in second.reason


def test_growth_past_the_budget_falls_through_to_germination() -> None:
    heuristic = policy()
    size = int(host_packet(1.0).training_metrics["param_count"])
    heuristic.propose(host_packet(1.0, max_parameters=size + 10))
    chosen = heuristic.propose(host_packet(1.0, max_parameters=size + 10))
    assert chosen.action == WAIT and "budget" in chosen.reason


def test_a_heuristic_held_to_a_share_of_the_budget_stops_there() -> None:
    size = int(host_packet(1.0).training_metrics["param_count"])
    budget = 4 * size  # room for a widen at the whole budget, none at a sixth of it
    whole, share = policy(), policy(budget_fraction=1 / 6)
    for heuristic in (whole, share):
        heuristic.propose(host_packet(1.0, max_parameters=budget))
    assert whole.propose(host_packet(1.0, max_parameters=budget)).action in (WIDEN, DEEPEN)
    held = share.propose(host_packet(1.0, max_parameters=budget))
    assert held.action == WAIT and "budget" in held.reason
    with pytest.raises(ValueError, match="budget_fraction"):
        HeuristicSettings(budget_fraction=0.0)


def test_the_budget_share_comes_from_tamiyos_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAMIYO_HEURISTIC_BUDGET_FRACTION", "0.25")
    settings = load_settings(TamiyoSettings)
    assert HeuristicSettings.from_tamiyo(settings).budget_fraction == 0.25


def test_growth_can_be_switched_off() -> None:
    heuristic = policy(enable_growth=False)
    heuristic.propose(host_packet(1.0))
    assert heuristic.propose(host_packet(1.0)).action == GERMINATE


def test_growth_history_survives_a_checkpoint_and_a_v1_snapshot_restores() -> None:
    heuristic = policy()
    hurting = [growth("fc1:w1", pb.SEED_STAGE_SHADOWING, **measured(-0.2, -0.1, 292))]
    heuristic.propose(host_packet(1.0, growths=hurting))
    heuristic.propose(host_packet(1.0, growths=hurting))
    restored = policy()
    restored.restore(heuristic.state())
    assert (
        restored.propose(host_packet(1.0)).layer_id == heuristic.propose(host_packet(1.0)).layer_id == "fc2"
    )
    old = {
        k: v for k, v in heuristic.state().items() if k in ("recent_losses", "best_before", "germinations")
    }
    policy().restore({**old, "version": "heuristic-v1", "evaluations_since_germination": None})
    with pytest.raises(HeuristicStateError, match="widen_gain"):
        policy().restore({**heuristic.state(), "widen_gain": {"fc1": "x"}})


# --- cost, command, gates ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "shape", "layer"),
    [
        ("mlp", (64,), "fc1"),
        ("mlp", (64,), "fc2"),
        ("cnn", (1, 8, 8), "conv1"),
        ("cnn", (1, 8, 8), "conv2"),
        ("conv1d", (2, 40), "conv1"),
        ("conv1d", (2, 40), "conv2"),
        ("transformer", (12,), "ff1"),
    ],
)
def test_the_counted_cost_of_a_widen_and_a_deepen_is_what_the_host_gains(
    kind: str, shape: tuple[int, ...], layer: str
) -> None:
    host = build_host(kind, shape, 10, width=4, vocab_size=16)
    packet = pb.SystemStatePacket()
    packet.topology.CopyFrom(host.topology())
    block, _ = growth_parameter_cost(packet, DEEPEN, layer, hidden=3)
    built = IdentityBlock.for_site(host.deepen_site(layer), 3)
    assert block == sum(p.numel() for p in built.parameters())
    before = host.parameter_count()
    site = host.widen_site(layer)
    width = site.producer.out_features if isinstance(site.producer, nn.Linear) else site.producer.out_channels
    set_width(site, width + 3)
    widen, _ = growth_parameter_cost(packet, WIDEN, layer, units=3)
    assert widen == host.parameter_count() - before


def test_a_widen_proposal_becomes_a_signed_growth_command() -> None:
    clock = ManualClock()
    packet = host_packet(1.0)
    proposal = Proposal(action=WIDEN, layer_id="fc1", units=4, growth_init=pb.GROWTH_INIT_RANDOM, reason="r")
    command = CommandFactory(SECRET, clock).build(proposal, packet, {"risk_gate": "pass"})
    validate_command(command)
    SignatureVerifier(SECRET, clock=clock).verify(command)
    spec = command.seed_operation.growth
    assert command.seed_operation.operation == pb.SEED_OP_WIDEN and command.target_seed_id == "fc1"
    assert (spec.layer_id, spec.units, spec.init) == ("fc1", 4, pb.GROWTH_INIT_RANDOM)
    assert command.annotations["risk_gate"] == "pass" and command.annotations["reason"] == "r"
    deepen = CommandFactory(SECRET, clock).build(Proposal(action=DEEPEN, layer_id="fc2"), packet)
    assert deepen.seed_operation.operation == pb.SEED_OP_DEEPEN


def test_the_budget_gate_holds_a_growth_past_the_budget() -> None:
    size = int(host_packet(1.0).training_metrics["param_count"])
    packet = host_packet(1.0, max_parameters=size + 100)
    gates = RiskGates(load_settings(TamiyoSettings, environ={}))
    small = gates.evaluate(Proposal(action=WIDEN, layer_id="fc2", units=4), packet, RiskContext())
    assert small.gate == "pass"
    big = gates.evaluate(Proposal(action=WIDEN, layer_id="fc1", units=4), packet, RiskContext())
    assert big.gate == "budget" and big.proposal.action == WAIT and big.proposal.layer_id == ""
    assert growth_over_budget(packet, WIDEN, "nope", units=1) is not None


def test_the_gnn_head_ends_with_widen_and_deepen_at_their_values_minus_one() -> None:
    assert ACTIONS[-2:] == (WIDEN, DEEPEN)
    assert all(ACTIONS.index(action) == action - 1 for action in ACTIONS)


def test_growth_operations_are_on_for_esper_run_and_their_thresholds_are_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from esper.leyline import load_settings
    from esper.tamiyo.settings import TamiyoSettings

    for name in ("GROWTH", "GROW_EARLY", "WIDEN_FRACTION", "MIN_GAIN_PER_PARAMETER"):
        monkeypatch.delenv(f"TAMIYO_HEURISTIC_{name}", raising=False)
    default = HeuristicSettings.from_tamiyo(load_settings(TamiyoSettings))
    assert default.enable_growth and default.grow_early
    monkeypatch.setenv("TAMIYO_HEURISTIC_GROWTH", "false")
    monkeypatch.setenv("TAMIYO_HEURISTIC_WIDEN_FRACTION", "0.5")
    monkeypatch.setenv("TAMIYO_HEURISTIC_MIN_GAIN_PER_PARAMETER", "0.001")
    configured = HeuristicSettings.from_tamiyo(load_settings(TamiyoSettings))
    assert not configured.enable_growth
    assert (configured.widen_fraction, configured.min_gain_per_parameter) == (0.5, 0.001)


def test_growing_early_widens_at_the_first_decision_until_a_widen_is_judged() -> None:
    early = HeuristicPolicy(HeuristicSettings(enable_growth=True, grow_early=True))
    late = HeuristicPolicy(HeuristicSettings(enable_growth=True))
    first = early.propose(host_packet(2.0))
    assert first.action == pb.POLICY_ACTION_WIDEN and "growing early" in first.reason
    assert late.propose(host_packet(2.0)).action == pb.POLICY_ACTION_WAIT
    # Once a widen was judged, growth goes on only while it pays (or on a plateau).
    early.restore({**early.state(), "widen_gain": {"fc1": 1e-7}, "last_gain": 1e-7})
    early.restore({**early.state(), "evaluations_since_germination": 10})
    assert early.propose(host_packet(1.0)).action != pb.POLICY_ACTION_WIDEN


def test_nothing_new_starts_when_it_could_not_finish_before_the_end_of_the_run() -> None:
    policy = HeuristicPolicy(HeuristicSettings(enable_growth=True, grow_early=True, last_growth_progress=0.8))
    late = host_packet(2.0)
    late.training_metrics["progress"] = 0.9
    proposal = policy.propose(late)
    assert proposal.action == pb.POLICY_ACTION_WAIT and "could not finish" in proposal.reason
    early = host_packet(2.0)
    early.training_metrics["progress"] = 0.1
    assert policy.propose(early).action == pb.POLICY_ACTION_WIDEN
