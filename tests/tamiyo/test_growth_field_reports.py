"""Field reports for growth commands: a WIDEN or DEEPEN is reported like a seed, under its growth's id."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from esper.leyline import pb
from esper.tamiyo.model.proposal import Proposal
from esper.tamiyo.records.store import TamiyoStore
from esper.tamiyo.runtime.service import TamiyoService
from tests.tamiyo.packets import SECRET, ScriptedPolicy, make_packet, settings

WIDEN = Proposal(action=pb.POLICY_ACTION_WIDEN, layer_id="layer-0", units=4, head_choices={"action": 6})
DEEPEN = Proposal(action=pb.POLICY_ACTION_DEEPEN, layer_id="layer-1", head_choices={"action": 7})


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TamiyoStore]:
    with TamiyoStore(tmp_path / "tamiyo.sqlite3") as opened:
        yield opened


def packet(epoch: int, accuracy: float, params: float) -> pb.SystemStatePacket:
    message = make_packet()
    message.packet_id = f"pkt-{epoch}-{accuracy}"
    message.current_epoch = epoch
    message.validation_accuracy = accuracy
    message.training_metrics["param_count"] = params
    return message


def decide_then_observe(
    store: TamiyoStore, proposal: Proposal, later: pb.SystemStatePacket
) -> pb.FieldReport:
    service = TamiyoService(settings(), ScriptedPolicy(proposal), SECRET, store=store)
    try:
        command = service.evaluate_step(packet(3, accuracy=0.50, params=1000.0))
        assert command.seed_operation.operation in (pb.SEED_OP_WIDEN, pb.SEED_OP_DEEPEN), command
        service.evaluate_step(later)
    finally:
        service.close(abort_open_windows=False)
    reports = {s.report.command_id: s.report for s in store.field_reports()}
    return reports[command.command_id]


def test_a_widen_is_reported_under_its_growth_with_its_measured_contribution(store: TamiyoStore) -> None:
    later = packet(4, accuracy=0.60, params=1200.0)
    for seed_id in ("layer-0:w1", "layer-0:w2"):  # an older growth of the layer, then this one
        state = later.growth_states.add(
            seed_id=seed_id, slot_id=seed_id, stage=pb.SEED_STAGE_PROBATIONARY, blueprint_id="widen"
        )
        state.metrics.update({"contribution_measured": 1.0, "contribution_accuracy": 0.03})
    later.growth_states.add(
        seed_id="layer-0:d3", slot_id="layer-0:d3", stage=pb.SEED_STAGE_TRAINING, blueprint_id="deepen"
    )
    report = decide_then_observe(store, WIDEN, later)
    assert (report.seed_id, report.blueprint_id) == ("layer-0:w2", "widen")
    assert report.action == pb.POLICY_ACTION_WIDEN
    assert report.outcome == pb.FIELD_REPORT_OUTCOME_SUCCESS
    assert report.metrics["contribution_accuracy"] == pytest.approx(0.03)
    assert report.metrics["growth_stage"] == pb.SEED_STAGE_PROBATIONARY
    assert report.metrics["param_delta"] == pytest.approx(200.0)


def test_a_merged_deepen_is_reported_on_its_layer_with_its_cost(store: TamiyoStore) -> None:
    report = decide_then_observe(store, DEEPEN, packet(4, accuracy=0.50, params=1500.0))
    assert (report.seed_id, report.blueprint_id) == ("layer-1", "deepen")
    assert report.outcome == pb.FIELD_REPORT_OUTCOME_NEUTRAL
    assert report.metrics["param_delta"] == pytest.approx(500.0)
    assert "contribution_accuracy" not in report.metrics


def end_of_life(store: TamiyoStore, slot_id: str, decided: pb.SystemStatePacket) -> pb.FieldReport:
    """A FOSSILIZE of `slot_id` decided on `decided`, its window closed by a packet where what it kept no
    longer shows (a widen merged into its layer, a fossil stacked into the host: the slot is dormant)."""
    proposal = Proposal(action=pb.POLICY_ACTION_FOSSILIZE, slot_id=slot_id, head_choices={"action": 2})
    service = TamiyoService(settings(), ScriptedPolicy(proposal), SECRET, store=store)
    try:
        command = service.evaluate_step(decided)
        assert command.seed_operation.operation == pb.SEED_OP_FOSSILIZE, command
        service._field_reports.lifecycle.observe(packet(4, accuracy=0.55, params=1200.0))  # type: ignore[union-attr]
    finally:
        service.close(abort_open_windows=False)
    (stored,) = store.field_reports()
    assert stored.report.command_id == command.command_id
    return stored.report


def test_a_kept_widen_is_reported_with_its_contribution_measured_at_the_keep(store: TamiyoStore) -> None:
    decided = packet(3, accuracy=0.50, params=1000.0)
    state = decided.growth_states.add(
        seed_id="layer-0:w1", slot_id="layer-0:w1", stage=pb.SEED_STAGE_PROBATIONARY, blueprint_id="widen"
    )
    state.metrics.update(
        {"contribution_measured": 1.0, "contribution_accuracy": 0.04, "fossilize_ready": 1.0}
    )
    report = end_of_life(store, "layer-0:w1", decided)
    assert report.seed_id == "layer-0:w1" and report.action == pb.POLICY_ACTION_FOSSILIZE
    assert report.metrics["end_contribution_accuracy"] == pytest.approx(0.04)


def test_a_stacked_fossil_is_reported_with_its_contribution_measured_at_the_keep(store: TamiyoStore) -> None:
    decided = packet(3, accuracy=0.50, params=1000.0)
    state = decided.seed_states[0]
    state.seed_id, state.stage, state.blueprint_id = "slot-0:g1", pb.SEED_STAGE_PROBATIONARY, "bp-1"
    state.metrics.update({"contribution_measured": 1.0, "contribution_accuracy": -0.02})
    report = end_of_life(store, "slot-0", decided)
    assert report.seed_id == "slot-0:g1"
    assert report.metrics["end_contribution_accuracy"] == pytest.approx(-0.02)
    assert "contribution_accuracy" not in report.metrics  # the dormant slot at window close has none


def test_an_end_whose_contribution_was_not_measured_reports_none(store: TamiyoStore) -> None:
    decided = packet(3, accuracy=0.50, params=1000.0)
    state = decided.growth_states.add(
        seed_id="layer-0:w1", slot_id="layer-0:w1", stage=pb.SEED_STAGE_PROBATIONARY, blueprint_id="widen"
    )
    state.metrics.update({"contribution_measured": 0.0, "contribution_accuracy": 0.0})
    report = end_of_life(store, "layer-0:w1", decided)
    assert "end_contribution_accuracy" not in report.metrics


def test_a_keep_whose_window_the_run_end_aborts_still_reports_its_contribution(store: TamiyoStore) -> None:
    decided = packet(3, accuracy=0.50, params=1000.0)
    state = decided.growth_states.add(
        seed_id="layer-0:d1", slot_id="layer-0:d1", stage=pb.SEED_STAGE_PROBATIONARY, blueprint_id="deepen"
    )
    state.metrics.update({"contribution_measured": 1.0, "contribution_accuracy": 0.01})
    proposal = Proposal(action=pb.POLICY_ACTION_FOSSILIZE, slot_id="layer-0:d1", head_choices={"action": 2})
    service = TamiyoService(settings(), ScriptedPolicy(proposal), SECRET, store=store)
    try:
        service.evaluate_step(decided)
    finally:
        service.close(abort_open_windows=True)
    (stored,) = store.field_reports()
    assert stored.report.outcome == pb.FIELD_REPORT_OUTCOME_ABORTED
    assert stored.report.metrics["end_contribution_accuracy"] == pytest.approx(0.01)
