"""The GNN grows layers: schema v2's layer features, the WIDEN/DEEPEN heads and their masks on every path,
the refusal of a previous schema's checkpoint, the catalogue's growth operations, and what Simic learns."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from esper.leyline import ManualClock, SignatureVerifier, pb, validate_command
from esper.tamiyo.model.budget import growth_over_budget
from esper.tamiyo.model.builder import GraphBuilder
from esper.tamiyo.model.checkpoint import CheckpointIncompatible, SchemaMismatch
from esper.tamiyo.model.distributions import head_distributions
from esper.tamiyo.model.gnn import TamiyoGNN
from esper.tamiyo.model.graph import TamiyoGraph, collate
from esper.tamiyo.model.outputs import GNNOutput
from esper.tamiyo.model.policy import GNNPolicy
from esper.tamiyo.model.proposal import ACTIONS, WIDEN_UNITS
from esper.tamiyo.model.schema import TAMIYO_SCHEMA
from esper.tamiyo.runtime.commands import CommandFactory
from esper.urza import GROWTH_OPERATIONS, GrowthOperation, growth_operation
from tests.tamiyo.packets import SECRET, SMALL, settings, small_policy
from tests.tamiyo.test_heuristic_growth import growth, host_packet

WIDEN, DEEPEN = pb.POLICY_ACTION_WIDEN, pb.POLICY_ACTION_DEEPEN
A = {action: index for index, action in enumerate(ACTIONS)}
LAYER = TAMIYO_SCHEMA.node("layer")
COLUMN = {name: index for index, name in enumerate(LAYER.features)}
V1_CHECKPOINT = Path(__file__).parent / "data" / "policy_schema_v1_tiny.safetensors"


def build(packet: pb.SystemStatePacket, **kwargs: object) -> TamiyoGraph:
    return GraphBuilder(settings(), **kwargs).build(packet, update_stats=False)  # type: ignore[arg-type]


def size(packet: pb.SystemStatePacket) -> int:
    return int(packet.training_metrics["param_count"])


def favouring(action: int, **kwargs: object) -> GNNPolicy:
    """A small policy whose action head strongly prefers `action` (a test-only weights tweak)."""
    policy = small_policy(**kwargs)
    with torch.no_grad():
        policy.module.action_head.bias[A[action]] += 30.0
    policy.module.drop_plan()
    return policy


# -- schema ---------------------------------------------------------------------------------------------


def test_layer_nodes_carry_width_growth_applied_and_the_budget_left() -> None:
    packet = host_packet(1.0, max_parameters=0)
    budget = size(packet) * 2
    grown = host_packet(
        1.0,
        max_parameters=budget,
        growths=[
            growth("fc1:w1", pb.SEED_STAGE_FOSSILIZED, units=4.0),
            growth("fc1:w2", pb.SEED_STAGE_TRAINING, units=2.0),
            growth("fc2:d1", pb.SEED_STAGE_FOSSILIZED, kind="deepen"),
        ],
    )
    plain, g = build(packet), build(grown)
    x, present = g.x["layer"], g.mask["layer"]
    fc1, fc2 = g.layer_ids.index("fc1"), g.layer_ids.index("fc2")
    assert x[fc1, COLUMN["grown_units_log"]] == pytest.approx(float(torch.log1p(torch.tensor(6.0))))
    assert x[fc1, COLUMN["growth_live"]] == 1.0 and x[fc2, COLUMN["growth_live"]] == 0.0
    assert x[fc2, COLUMN["deepened"]] == 1.0
    assert x[fc1, COLUMN["budget_left_frac"]] == pytest.approx(0.5)
    assert present[fc1, COLUMN["budget_left_frac"]] == 1.0
    assert plain.mask["layer"][fc1, COLUMN["budget_left_frac"]] == 0.0  # no budget: absent, not "none left"
    # Kasmina's rule: fc1's live widen changes fc1 and fc2 (its consumer), so neither may grow now.
    assert (x[fc1, COLUMN["can_widen"]], x[fc1, COLUMN["can_deepen"]]) == (0.0, 0.0)
    assert (x[fc2, COLUMN["can_widen"]], x[fc2, COLUMN["can_deepen"]]) == (0.0, 0.0)
    # Fossilised growths hold nothing, except that a layer with a block after it no longer widens.
    settled = host_packet(
        1.0,
        growths=[
            growth("fc1:w1", pb.SEED_STAGE_FOSSILIZED, units=4.0),
            growth("fc2:d1", pb.SEED_STAGE_FOSSILIZED, kind="deepen"),
        ],
    )
    x = build(settled).x["layer"]
    assert (x[fc1, COLUMN["can_widen"]], x[fc1, COLUMN["can_deepen"]]) == (1.0, 1.0)
    assert (x[fc2, COLUMN["can_widen"]], x[fc2, COLUMN["can_deepen"]]) == (0.0, 1.0)
    assert TAMIYO_SCHEMA.version == "tamiyo-graph-v2"


def test_a_checkpoint_built_for_the_previous_schema_is_refused_naming_both_schemas() -> None:
    """The fixture was saved by the previous code (schema tamiyo-graph-v1) with `GNNPolicy.save`."""
    policy = small_policy()
    before = policy.version
    with pytest.raises(SchemaMismatch) as caught:
        policy.load_state_bytes(V1_CHECKPOINT.read_bytes())
    assert isinstance(caught.value, CheckpointIncompatible)
    assert caught.value.built_for == "tamiyo-graph-v1" and caught.value.expected == "tamiyo-graph-v2"
    assert "built for graph schema tamiyo-graph-v1" in str(caught.value)
    assert "expects tamiyo-graph-v2" in str(caught.value)
    assert policy.version == before  # nothing was loaded
    with pytest.raises(SchemaMismatch):
        GNNPolicy.load(V1_CHECKPOINT, settings())


# -- masks ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("headroom", [None, 0, 30, 90, 400, 10_000])
def test_growth_masks_are_the_budget_modules_verdicts(headroom: int | None) -> None:
    packet = host_packet(1.0)
    packet.max_parameters = 0 if headroom is None else size(packet) + headroom
    g = build(packet)
    allowed = settings().gnn_widen_units
    for index, layer in enumerate(packet.topology.layers):
        grows = pb.SEED_OP_WIDEN in layer.growth_operations
        for k, units in enumerate(WIDEN_UNITS):
            fits = growth_over_budget(packet, WIDEN, layer.layer_id, units=units) is None
            assert bool(g.widen_amount_mask[index, k]) == (grows and units in allowed and fits)
        deepens = pb.SEED_OP_DEEPEN in layer.growth_operations
        fits = growth_over_budget(packet, DEEPEN, layer.layer_id) is None
        assert bool(g.layer_action_mask[index, A[DEEPEN]]) == (deepens and fits)
        assert bool(g.layer_action_mask[index, A[WIDEN]]) == bool(g.widen_amount_mask[index].any())
    assert bool(g.action_mask[0, A[WIDEN]]) == bool(g.layer_action_mask[:, A[WIDEN]].any())
    assert bool(g.action_mask[0, A[DEEPEN]]) == bool(g.layer_action_mask[:, A[DEEPEN]].any())


def test_a_layer_with_an_active_seed_cannot_widen_and_an_unmeasured_size_grows_nothing() -> None:
    g = build(host_packet(1.0, slot_stages={"h1": pb.SEED_STAGE_TRAINING}))
    fc1 = g.layer_ids.index("fc1")
    assert not g.layer_action_mask[fc1, A[WIDEN]] and g.layer_action_mask[fc1, A[DEEPEN]]
    unmeasured = host_packet(1.0, max_parameters=10_000)
    del unmeasured.training_metrics["param_count"]
    g = build(unmeasured)
    assert not g.action_mask[0, A[WIDEN]] and not g.action_mask[0, A[DEEPEN]]


def test_the_three_paths_and_the_batched_distributions_agree_on_a_growth_graph() -> None:
    packet = host_packet(
        1.0, max_parameters=0, growths=[growth("fc1:w1", pb.SEED_STAGE_FOSSILIZED, units=4.0)]
    )
    packet.max_parameters = size(packet) + 90
    g = build(packet)
    torch.manual_seed(0)
    model = TamiyoGNN(SMALL).eval()
    with torch.inference_mode():
        reference = model.forward_message_passing(g)
        dense = model(g)
    model.build_plan(g)
    with torch.inference_mode():
        planned = model(g)
    for name in GNNOutput.__dataclass_fields__:
        torch.testing.assert_close(getattr(dense, name), getattr(reference, name), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(getattr(planned, name), getattr(reference, name), rtol=1e-4, atol=1e-4)
    other = build(host_packet(1.0))
    with torch.no_grad():
        single = head_distributions(model.forward_message_passing(g), g)
        batch = collate([g, other])
        both = head_distributions(model.forward_message_passing(batch), batch)
    rows = len(g.layer_ids)
    torch.testing.assert_close(both.layer[:rows], single.layer, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both.amount[:rows], single.amount, rtol=1e-5, atol=1e-5)


# -- decisions ------------------------------------------------------------------------------------------


def test_a_gnn_widen_becomes_a_signed_growth_command_like_the_heuristics() -> None:
    policy = favouring(WIDEN, greedy=True)
    packet = host_packet(1.0)
    proposal = policy.propose(packet)
    assert proposal.action == WIDEN and proposal.layer_id in ("fc1", "fc2")
    assert proposal.units in settings().gnn_widen_units
    assert set(proposal.head_choices) == {"action", "layer", "amount"}
    clock = ManualClock()
    command = CommandFactory(SECRET, clock).build(proposal, packet)
    validate_command(command)
    SignatureVerifier(SECRET, clock=clock).verify(command)
    spec = command.seed_operation.growth
    assert command.seed_operation.operation == pb.SEED_OP_WIDEN
    assert (spec.layer_id, spec.units) == (proposal.layer_id, proposal.units)
    deepen = favouring(DEEPEN, greedy=True).propose(packet)
    assert deepen.action == DEEPEN and deepen.layer_id in ("fc1", "fc2") and deepen.units == 0
    assert set(deepen.head_choices) == {"action", "layer"}


def test_a_network_that_wants_to_widen_never_proposes_a_widen_past_the_budget() -> None:
    packet = host_packet(1.0)
    packet.max_parameters = size(packet) + 30  # room for 2 units of fc2 (15 each), none of fc1 (69 each)
    policy = favouring(WIDEN)
    for _ in range(20):
        proposal = policy.propose(packet)
        assert proposal.action == WIDEN
        assert (proposal.layer_id, proposal.units) == ("fc2", 2)
        assert growth_over_budget(packet, WIDEN, "fc2", units=proposal.units) is None
    packet.max_parameters = size(packet) + 1
    assert all(policy.propose(packet).action != WIDEN for _ in range(10))


def test_the_learners_log_prob_of_a_recorded_widen_equals_the_actors() -> None:
    policy = favouring(WIDEN, seed=3)
    packet = host_packet(1.0)
    packet.max_parameters = size(packet) + 500
    proposals = [policy.propose(packet) for _ in range(6)]
    widens = [p for p in proposals if p.action == WIDEN]
    assert widens
    graphs = []
    for proposal in widens:  # rebuilt as Simic does: with the normaliser statistics the actor used
        learner = GraphBuilder(settings())
        learner.normalizer.load_states(proposal.normalized_with)
        graphs.append(learner.build(packet, update_stats=False))
    evaluation = policy.evaluate_actions(graphs, [p.head_choices for p in widens])
    for row, proposal in enumerate(widens):
        for head, log_prob in proposal.head_log_probs.items():
            assert float(evaluation.log_probs[head][row].detach()) == pytest.approx(log_prob, abs=1e-5)
        assert float(evaluation.total_log_prob[row].detach()) == pytest.approx(proposal.log_prob, abs=1e-5)
        assert bool(evaluation.relevant["amount"][row]) and not bool(evaluation.relevant["slot"][row])


# -- the catalogue --------------------------------------------------------------------------------------


def test_the_catalogue_describes_widen_and_deepen_as_it_describes_blueprints() -> None:
    ids = [operation.op_id for operation in GROWTH_OPERATIONS]
    assert ids == ["op:widen", "op:deepen"]
    widen = growth_operation("op:widen")
    assert widen is not None and widen.seed_operation == pb.SEED_OP_WIDEN
    assert set(WIDEN_UNITS) == set(widen.allowed_amounts) and "linear" in widen.host_kinds
    listed = widen.as_dict()
    assert {"id", "kind", "host_kinds", "allowed_amounts", "cost_per_unit"} <= set(listed)
    assert growth_operation("op:nope") is None


def test_the_builder_reads_the_growth_operations_from_the_catalogue() -> None:
    widen = growth_operation("op:widen")
    assert widen is not None
    only_four = {"op:widen": replace(widen, allowed_amounts=(4,)), "op:deepen": growth_operation("op:deepen")}
    g = build(host_packet(1.0), growth_operations=only_four.get)
    assert g.widen_amount_mask.any(dim=0).tolist() == [units == 4 for units in WIDEN_UNITS]
    no_linear: dict[str, GrowthOperation | None] = {
        op_id: replace(op, host_kinds=("conv",)) for op_id, op in ((o.op_id, o) for o in GROWTH_OPERATIONS)
    }
    g = build(host_packet(1.0), growth_operations=no_linear.get)
    assert not g.action_mask[0, A[WIDEN]] and not g.action_mask[0, A[DEEPEN]]


def test_one_builder_follows_growths_and_the_budget_from_packet_to_packet() -> None:
    builder = GraphBuilder(settings())
    free = host_packet(1.0)
    growing = host_packet(1.0, growths=[growth("fc1:w1", pb.SEED_STAGE_TRAINING, units=2.0)])
    tight = host_packet(1.0)
    tight.max_parameters = size(tight) + 1
    widen = A[WIDEN]
    masks = [builder.build(p, update_stats=False).action_mask[0, widen] for p in (free, growing, tight, free)]
    assert [bool(m) for m in masks] == [True, False, False, True]
    first, again = (builder.build(free, update_stats=False) for _ in range(2))
    assert first.layer_action_mask is again.layer_action_mask  # kept while nothing grows


def test_the_widen_amounts_are_settings_from_the_amount_heads_options(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pydantic import ValidationError

    from esper.leyline import load_settings
    from esper.tamiyo.settings import TamiyoSettings

    monkeypatch.setenv("TAMIYO_GNN_WIDEN_UNITS", "4,16")
    chosen = load_settings(TamiyoSettings)
    assert chosen.gnn_widen_units == (4, 16)
    g = GraphBuilder(chosen).build(host_packet(1.0), update_stats=False)
    assert g.widen_amount_mask.any(dim=0).tolist() == [units in (4, 16) for units in WIDEN_UNITS]
    with pytest.raises(ValidationError, match=r"\[3\] are not widen amount options"):
        TamiyoSettings(gnn_widen_units=(3,))


def test_growths_are_slot_nodes_the_gnn_fossilises_once_ready_and_may_cull() -> None:
    probation = growth("fc2:w1", pb.SEED_STAGE_PROBATIONARY, units=2.0)
    g = build(host_packet(1.0, growths=[probation]))
    row = g.slot_ids.index("fc2:w1")
    assert g.seed_ids[row] == "fc2:w1" and g.slot_ids[:2] == ("h1", "h2")
    assert g.num_nodes("slot") == 3 and g.coverage is not None and not g.coverage.unlinked_seeds
    assert not g.slot_action_mask[row, A[pb.POLICY_ACTION_FOSSILIZE]]  # not reported ready yet
    assert g.slot_action_mask[row, A[pb.POLICY_ACTION_CULL]]
    assert not g.slot_action_mask[row, A[pb.POLICY_ACTION_GERMINATE]]
    ready = growth("fc2:w1", pb.SEED_STAGE_PROBATIONARY, units=2.0, fossilize_ready=1.0)
    packet = host_packet(1.0, growths=[ready])
    g = build(packet)
    assert g.slot_action_mask[row, A[pb.POLICY_ACTION_FOSSILIZE]]
    proposal = favouring(pb.POLICY_ACTION_FOSSILIZE, greedy=True).propose(packet)
    assert (proposal.action, proposal.slot_id) == (pb.POLICY_ACTION_FOSSILIZE, "fc2:w1")
    command = CommandFactory(SECRET, ManualClock()).build(proposal, packet)
    assert command.target_seed_id == "fc2:w1"
    assert command.seed_operation.operation == pb.SEED_OP_FOSSILIZE
    ended = build(host_packet(1.0, growths=[growth("fc2:w1", pb.SEED_STAGE_EMBARGOED)]))
    assert "fc2:w1" not in ended.slot_ids
